r"""Attention transfer only (Zagoruyko & Komodakis 2017), beta = 1000 (weight = beta/2).

The same teacher as configs/mkd.py; the student (MobileNetV2) learns with cross-entropy + attention transfer at three stages.
Reuse a trained teacher instead of retraining it:
  python -m fer_jax.main --config=configs/baseline_at.py --workdir=workdirs/fer_baseline_at \
      --config.teacher.checkpoint=workdirs/fer_mkd/teacher/best
Embedded default: python -m fer_jax.main --config=configs/baseline_at.py --workdir=workdirs/fer_baseline_at
  expected: see experiments/synthetic/results.md for the measured row.
Smoke test: --config=configs/baseline_at.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  config = mkd.get_config(arg)
  config.name = "baseline_at"
  config.student.terms = {"ce": dict(weight=1.0), "at": dict(kind="attention_transfer", weight=500.0, pairs=(("stage3", "stage2"), ("stage4", "stage3"), ("stage5", "stage4")))}
  return config
