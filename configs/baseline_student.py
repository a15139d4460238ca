r"""The student alone: MobileNetV2 trained on labels only (the no-distillation ablation).

configs/mkd.py with ``distill=none``: the same student and schedule, no teacher.
Embedded default: python -m fer_jax.main --config=configs/baseline_student.py
  measured: see experiments/synthetic/results.md for the row.
Smoke test: --config=configs/baseline_student.py:smoke
"""
from configs import mkd


def get_config(arg=None):
  return mkd.get_config(f"{arg or ''},distill=none,name=baseline_student")
