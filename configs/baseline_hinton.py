r"""Hinton KD only (Hinton et al. 2015): logits, T = 4.

The same teacher as configs/mkd.py; the student (MobileNetV2) learns with cross-entropy + Hinton logit KD.
Reuse a trained teacher instead of retraining it:
  python -m fer_jax.main --config=configs/baseline_hinton.py --workdir=workdirs/fer_baseline_hinton \
      --config.teacher.checkpoint=workdirs/fer_mkd/teacher/best
Embedded default: python -m fer_jax.main --config=configs/baseline_hinton.py --workdir=workdirs/fer_baseline_hinton
  expected: see experiments/synthetic/results.md for the measured row.
Smoke test: --config=configs/baseline_hinton.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  config = mkd.get_config(arg)
  config.name = "baseline_hinton"
  config.student.terms = {"ce": dict(weight=0.1), "kd": dict(kind="hinton_kd", weight=0.9, temperature=4.0)}
  return config
