r"""FitNets hints only (Romero et al. 2015): 1x1 adapters at three stages.

The same teacher as configs/mkd.py; the student (MobileNetV2) learns with cross-entropy + FitNets hints (single stage, jointly trained).
Reuse a trained teacher instead of retraining it:
  python -m fer_jax.main --config=configs/baseline_fitnets.py --workdir=workdirs/fer_baseline_fitnets \
      --config.teacher.checkpoint=workdirs/fer_mkd/teacher/best
Embedded default: python -m fer_jax.main --config=configs/baseline_fitnets.py --workdir=workdirs/fer_baseline_fitnets
  expected: see experiments/synthetic/results.md for the measured row.
Smoke test: --config=configs/baseline_fitnets.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  config = mkd.get_config(arg)
  config.name = "baseline_fitnets"
  config.student.terms = {"ce": dict(weight=1.0), "fitnet": dict(weight=1.0, standardize=False, pairs=(("stage3", "stage2"), ("stage4", "stage3"), ("stage5", "stage4")))}
  return config
