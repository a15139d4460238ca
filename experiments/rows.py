"""The reproduction rows shared by experiments/fer2013 and experiments/ferplus.

A row is a config built from configs/*.py on a real dataset. Teacher rows
(``teacher`` and its ablations) run the AFNet phase only; student rows run the
teacher and the student phases, or take a trained teacher with
``teacher_checkpoint=DIR`` (what experiments/run.py passes, so the teacher is
trained once per suite). ``quick`` is the 2-core CPU budget: the configs'
``cpu`` models (the embedded default's strided-stem AFNet-ResNet18/16 and
MobileNetV2-0.5, AdamW), at most ``QUICK_EPOCHS`` epochs per phase, and
``QUICK_AUGMENT``: the synthetic occluders and flips only. Random crops,
rotation and random erasing cost the teacher 8.7 points of PublicTest accuracy
after one FER2013 epoch (30.2 % against 38.9 % without any of them, 36.9 %
with the occluders kept), and after 10 epochs the teacher still ends 4.4 points
higher without them (52.1 % against 47.7 % PrivateTest): the quick models
underfit, their training accuracy at or below PublicTest accuracy throughout.
Contrastive pre-training phases stop at ``QUICK_CONTRASTIVE_EPOCHS``: a MoCo
step of ASDC's width-32 teacher encoder on two views of 256 faces takes 3.4 s
on 2 cores (13 ms a face, against 3.3 ms for the quick AFNet teacher), so 10
epochs of its teacher alone would take an hour.
"""
import ml_collections

from configs import (asdc, baseline_at, baseline_fitnets, baseline_hinton, baseline_student,
                     mkd, teacher_bounded)

# Each ablation: AFNet keyword arguments, and the teacher loss terms it removes
# (without regions there is no region regulariser to add).
TEACHER_ROWS = {
    "teacher": ({}, ()),
    "teacher_no_fpn": ({"use_fpn": False}, ()),
    "teacher_no_regions": ({"num_regions": 0}, ("region",)),
    "teacher_no_channel_mask": ({"channel_mask_keep": 1.0}, ()),
}
# Student rows reuse the ablation configs, so a row and its config cannot drift apart.
STUDENT_CONFIGS = {"student_alone": baseline_student, "hinton": baseline_hinton,
                   "at": baseline_at, "fitnets": baseline_fitnets,
                   "fitnets_standardized": baseline_fitnets, "mkd": mkd,
                   "mkd_standardized": mkd}
# Student rows that change fields of one of their config's loss terms.
TERM_VARIANTS = {"fitnets_standardized": ("fitnet", {"standardize": True}),
                 "mkd_standardized": ("mkd", {"standardize": True})}
ROWS = (*TEACHER_ROWS, *STUDENT_CONFIGS, "tb_cls", "asdc_probe")
QUICK_EPOCHS = 10
QUICK_CONTRASTIVE_EPOCHS = 4
QUICK_AUGMENT = dict(crop_scale=(1.0, 1.0), rotation_deg=0.0, erase_prob=0.0)


def reuses_teacher(row: str, config: ml_collections.ConfigDict) -> bool:
  """Whether ``row`` distils the shared AFNet teacher (so takes ``teacher_checkpoint``).

  ASDC's teacher is its own self-supervised encoder, and the student trained
  alone has no teacher phase.
  """
  return row in (*STUDENT_CONFIGS, "tb_cls") and "teacher" in config.phases


def row_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  arg = mkd.cu.parse_arg(arg, row="mkd", quick=False, seed=0, teacher_checkpoint="",
                         epochs=0, steps=0)
  if arg.row not in ROWS:
    raise ValueError(f"unknown row {arg.row!r}; rows: {', '.join(ROWS)}")
  base = f"data={dataset},seed={arg.seed}" + (",cpu" if arg.quick else "")
  if arg.row == "asdc_probe":
    config = asdc.get_config(base)
  elif arg.row == "tb_cls":
    # The classification part of teacher-bounded KD: its EfficientFormer student
    # with alpha*CE + (1-alpha)*Hinton, distilled from the AFNet teacher. L1, not
    # the paper's L3: at 224 px L3 (3.91 GMACs) would cost more than the full
    # AFNet teacher (1.69 G); L1 is 1.29 G.
    config = mkd.get_config(base)
    tb = teacher_bounded.get_config(base)
    config.student = tb.student_efficientformer
    config.student.model = "efficientformer_l1"
    config.student.model_kwargs = {}
    config.student.terms = {k: v for k, v in tb.student_efficientformer.terms.items()
                            if k in ("ce", "kd")}
  else:
    config = STUDENT_CONFIGS.get(arg.row, mkd).get_config(base)
  config.name = f"{dataset}/{arg.row}"
  if arg.row in TEACHER_ROWS:
    config.phases = ("teacher",)
    model_kwargs, removed_terms = TEACHER_ROWS[arg.row]
    config.teacher.model_kwargs.update(model_kwargs)
    config.teacher.terms = {k: v for k, v in config.teacher.terms.items()
                            if k not in removed_terms}
  if arg.row in TERM_VARIANTS:
    term, fields = TERM_VARIANTS[arg.row]
    config.student.terms[term].update(fields)
  if arg.teacher_checkpoint and reuses_teacher(arg.row, config):
    config.teacher.checkpoint = arg.teacher_checkpoint
  for phase in config.phases:
    if arg.epochs:
      config[phase].epochs = arg.epochs
    if arg.steps:
      config[phase].steps = arg.steps
    if arg.quick:
      cap = QUICK_CONTRASTIVE_EPOCHS if config[phase].contrastive else QUICK_EPOCHS
      config[phase].epochs = min(config[phase].epochs, cap)
  if arg.quick:
    config.augment.update(QUICK_AUGMENT)
  return config
