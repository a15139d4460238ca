#!/usr/bin/env bash
# Prepares a bare GPU machine of the device tool (no network) for experiments/run.py:
# installs the carried wheels and rebuilds ../shared/data from the carried parts.
# Everything it writes stays in the git-ignored .device/ folder of the checkout.
# Usage (from the repo root there): source experiments/device_setup.sh
set -e
root="$PWD/.device"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$root/site" .whl/*.whl
fi
export PYTHONPATH="$root/site:$PWD"
mkdir -p "$root/data/fer2013"
# The pixels travel in two calls (64 MiB a call); part a is kept in data/, which is never carried.
if [ -d .device/a ]; then cp .device/a/pixels_a.npy "$root/data/"; fi
if [ -d .device/b ]; then
  cp -r .device/b/ferplus .device/b/challenge_condition_fer "$root/data/"
  python3 - "$root" <<'PY'
import sys
import numpy as np
root = sys.argv[1]
meta = dict(np.load(f"{root}/b/meta.npz"))
pixels = np.concatenate([np.load(f"{root}/data/pixels_a.npy"), np.load(f"{root}/b/pixels_b.npy")])
np.savez(f"{root}/data/fer2013/fer2013.npz", pixels=pixels, **meta)
print("fer2013.npz rebuilt:", pixels.shape)
PY
fi
mkdir -p ../shared
[ -e ../shared/data ] || ln -s "$root/data" ../shared/data
set +e
