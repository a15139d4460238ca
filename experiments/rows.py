"""The reproduction rows shared by experiments/fer2013 and experiments/ferplus.

A row is a method config with its arguments (configs/mkd.py, configs/asdc.py);
nothing here edits a config. Teacher rows (``teacher`` and its ablations) run
the AFNet phase only; student rows run the teacher and the student phases, or
take a trained teacher with ``teacher_checkpoint=DIR`` (what
experiments/run.py passes, so the teacher is trained once per suite and seed).
``quick`` is the configs' ``tier=quick``, the 2-core CPU budget
(configs/common.py).
"""
import importlib

import ml_collections

from fer_jax import config_utils as cu

# row -> (config module under configs/, its arguments)
ROWS = {
    "teacher": ("mkd", "teacher_only"),
    "teacher_no_fpn": ("mkd", "teacher_only,teacher=no_fpn"),
    "teacher_no_regions": ("mkd", "teacher_only,teacher=no_regions"),
    "teacher_no_channel_mask": ("mkd", "teacher_only,teacher=no_channel_mask"),
    "student_alone": ("mkd", "distill=none"),
    "hinton": ("mkd", "distill=hinton"),
    "at": ("mkd", "distill=at"),
    "fitnets": ("mkd", "distill=fitnets,variant=raw"),
    "fitnets_standardized": ("mkd", "distill=fitnets,variant=standardized"),
    "mkd": ("mkd", "variant=raw"),
    "mkd_standardized": ("mkd", "variant=standardized"),
    "tb_cls": ("mkd", "distill=hinton,student=efficientformer_l1"),
    "asdc_probe": ("asdc", ""),
}


def reuses_teacher(row: str) -> bool:
  """Whether ``row`` distils the shared AFNet teacher (so takes ``teacher_checkpoint``).

  ASDC's teacher is its own self-supervised encoder, and the student trained
  alone has no teacher phase.
  """
  module, args = ROWS[row]
  return module == "mkd" and "teacher_only" not in args and "distill=none" not in args


def config_arg(dataset: str, arg: str | None) -> tuple[str, str]:
  """The config module and argument string of ``row=NAME,...`` on ``dataset``."""
  arg = cu.parse_arg(arg, row="mkd", quick=False, seed=0, teacher_checkpoint="",
                     epochs=0.0, steps=0)
  module, own = cu.choose("row", arg.row, ROWS)
  fields = [f"data={dataset}", f"seed={arg.seed}", f"name={dataset}/{arg.row}", own,
            "tier=quick" if arg.quick else "tier=full",
            f"epochs={arg.epochs}" if arg.epochs else "",
            f"steps={arg.steps}" if arg.steps else ""]
  if arg.teacher_checkpoint and reuses_teacher(arg.row):
    fields.append(f"teacher_checkpoint={arg.teacher_checkpoint}")
  return module, ",".join(f for f in fields if f)


def row_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  module, config_args = config_arg(dataset, arg)
  return importlib.import_module(f"configs.{module}").get_config(config_args)
