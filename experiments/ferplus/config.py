r"""FERPlus reproduction rows, majority labels (select on Valid, report on Test + RAN lists).

  python -m fer_jax.main --config=experiments/ferplus/config.py:row=mkd --workdir=workdirs/ferplus_mkd
Rows: teacher, teacher_no_fpn, teacher_no_regions, teacher_no_channel_mask,
student_alone, hinton, at, fitnets, fitnets_standardized, mkd, mkd_standardized,
tb_cls, asdc_probe. Add ``quick`` for a 2-core CPU budget and
``teacher_checkpoint=DIR/teacher/best`` to reuse a teacher.
experiments/ferplus/results.md holds the measured table and each row's command.
"""
from experiments import rows


def get_config(arg=None):
  return rows.row_config("ferplus", arg)
