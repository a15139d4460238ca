r"""Attention transfer only (Zagoruyko & Komodakis 2017), beta = 1000 (weight = beta/2).

configs/mkd.py with ``distill=at``: CE + attention transfer at three stages.
Embedded default: python -m fer_jax.main --config=configs/baseline_at.py
  measured: see experiments/synthetic/results.md for the row.
Reuse a trained teacher instead of retraining it:
  --config=configs/baseline_at.py:teacher_checkpoint=workdirs/mkd/teacher/model
Smoke test: --config=configs/baseline_at.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  return mkd.get_config(f"{arg or ''},distill=at,name=baseline_at")
