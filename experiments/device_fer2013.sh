#!/usr/bin/env bash
# The full-size FER2013 rows (AFNet teacher, MKD student; configs/mkd.py:tier=full) on a
# lent accelerator, in one call of the device tool (experiments/device_run.py says how).
#
# Here, once (the pack is 58 MiB, the wheels 2.4 MiB; both are git-ignored):
#   python -m experiments.device_run pack --config=configs/mkd.py:data=fer2013,tier=full \
#       --pack=.device/fer2013_pack.npz
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl flax==0.12.8 \
#       optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92 ml-collections==1.1.0
# Then the device tool's run, with carry [".whl", ".device/fer2013_pack.npz"] and
# timeout_s 560:
#   bash experiments/device_fer2013.sh
# What comes back under $OUT: results.json, report.md, metrics.jsonl, plan.json, the
# student's model directory and the log.
set -o pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The machine's own jax; our pinned Flax stack and ml-collections (which it lacks) on top.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .device/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/.device/site:$PWD"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
    || exit 1
python3 -m experiments.device_run train --config=configs/mkd.py:data=fer2013,tier=full \
    --pack=.device/fer2013_pack.npz --budget_s=470 --workdir=.device/run --results="$OUT" \
    2>&1 | tee "$OUT/log.txt" | tr '\r' '\n' | grep -v "step/s\|^I12\|^W12" | tail -40
