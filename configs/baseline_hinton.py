r"""Hinton KD only (Hinton et al. 2015): logits, T = 4.

configs/mkd.py with ``distill=hinton``: the student learns with 0.1 CE + 0.9 Hinton KD.
Embedded default: python -m fer_jax.main --config=configs/baseline_hinton.py
  measured: see experiments/synthetic/results.md for the row.
Reuse a trained teacher instead of retraining it:
  --config=configs/baseline_hinton.py:teacher_checkpoint=workdirs/mkd/teacher/model
Smoke test: --config=configs/baseline_hinton.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  return mkd.get_config(f"{arg or ''},distill=hinton,name=baseline_hinton")
