r"""Rows on the embedded procedural faces: every KD method at the configs' default schedules.

  python -m experiments.run --suite=synthetic \
      --rows=teacher,student_alone,hinton,at,fitnets,mkd --workroot=workdirs/rows
  python -m fer_jax.main --config=experiments/synthetic/config.py:row=hinton --workdir=DIR
Rows: teacher, teacher_no_fpn, teacher_no_regions, teacher_no_channel_mask,
student_alone, hinton, at, fitnets, mkd, tb_cls, asdc_probe. Each row is the
configs/*.py config of the same name on the default data, so a row and the
default run cannot drift apart. experiments/synthetic/results.md holds the
measured table and each row's command.
"""
from experiments import rows


def get_config(arg=None):
  return rows.row_config("synthetic", arg)
