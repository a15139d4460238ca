r"""The student alone: MobileNetV2 trained on labels only (the no-distillation ablation).

The student of configs/mkd.py with the same schedule, no teacher.
Embedded default: python -m fer_jax.main --config=configs/baseline_student.py --workdir=workdirs/fer_baseline_student
  expected: see experiments/synthetic/results.md for the measured row.
Smoke test: --config=configs/baseline_student.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  config = mkd.get_config(arg)
  config.name = "baseline_student"
  config.phases = ("student",)
  config.student.teacher = ""
  config.student.terms = {"ce": dict(weight=1.0)}
  return config
