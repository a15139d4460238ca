r"""FitNets hints only (Romero et al. 2015): 1x1 adapters at three stages.

configs/mkd.py with ``distill=fitnets``: CE + hints, channel-standardised by default
(``variant=raw`` for the paper's plain MSE).
Embedded default: python -m fer_jax.main --config=configs/baseline_fitnets.py
  measured: see experiments/synthetic/results.md for the row.
Reuse a trained teacher instead of retraining it:
  --config=configs/baseline_fitnets.py:teacher_checkpoint=workdirs/mkd/teacher/model
Smoke test: --config=configs/baseline_fitnets.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  return mkd.get_config(f"{arg or ''},distill=fitnets,name=baseline_fitnets")
