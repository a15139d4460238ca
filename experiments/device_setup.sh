#!/usr/bin/env bash
# Prepares a bare GPU machine of the device tool (no network) for experiments/run.py:
# installs the carried wheels and rebuilds ../shared/data from the carried parts.
# Usage (from the repo root there): source experiments/device_setup.sh
set -e
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/fer_data/fer2013
if [ -d .device/a ]; then cp .device/a/pixels_a.npy /tmp/fer_data/; fi
if [ -d .device/b ]; then
  cp -r .device/b/ferplus .device/b/challenge_condition_fer /tmp/fer_data/
  python3 - <<'PY'
import numpy as np
meta = dict(np.load(".device/b/meta.npz"))
pixels = np.concatenate([np.load("/tmp/fer_data/pixels_a.npy"), np.load(".device/b/pixels_b.npy")])
np.savez("/tmp/fer_data/fer2013/fer2013.npz", pixels=pixels, **meta)
print("fer2013.npz rebuilt:", pixels.shape)
PY
fi
mkdir -p ../shared
[ -e ../shared/data ] || ln -s /tmp/fer_data ../shared/data
set +e
