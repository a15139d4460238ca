"""The arguments every method config takes (``configs/<method>.py:<arguments>``), in one place.

  smoke              a few steps per phase on a few dozen faces (tests, a first look)
  data=NAME          synthetic (default: the embedded faces), fer2013, ferplus, affectnet
  seed=N             the run's seed
  tier=auto|full|quick|cpu  on real data, the size of the models and recipe:
                     ``auto`` (default): ``cpu`` when JAX runs on the CPU, else ``full``;
                     ``full``: the papers' sizes, for an accelerator;
                     ``quick``: the 2-core smoke budget of experiments/README.md (the
                     embedded default's small strided models, at most ``QUICK_EPOCHS``
                     epochs a phase, contrastive pre-training at most
                     ``QUICK_CONTRASTIVE_EPOCHS``, and the synthetic occluders and flips
                     as the only augmentation);
                     ``cpu``: models and recipes designed for 48 px faces on a CPU
                     (configs that have one; see their docstrings).
                     The embedded faces always take the embedded default's models.
  epochs=E, steps=N  every phase's length
  teacher_checkpoint=DIR  a trained teacher's model directory (``<workdir>/teacher/model``)
                     for the phases that distil the 'teacher' phase, instead of training it
  name=NAME          the run's name (default: the config's)
"""
import jax
import ml_collections

from fer_jax import config_utils as cu

COMMON = dict(smoke=False, data="synthetic", seed=0, tier="auto", epochs=0.0, steps=0,
              teacher_checkpoint="", name="")
TIERS = ("auto", "full", "quick", "cpu")
QUICK_EPOCHS = 10
# A MoCo step of ASDC's width-32 teacher encoder on two views costs 13 ms a
# face on 2 cores (3.3 ms for the quick AFNet teacher): 10 epochs would take an hour.
QUICK_CONTRASTIVE_EPOCHS = 4
# Random crops, rotation and random erasing cost the small CPU teacher 8.7 points
# of PublicTest after one FER2013 epoch and 4.4 points after ten: it underfits.
QUICK_AUGMENT = dict(crop_scale=(1.0, 1.0), rotation_deg=0.0, erase_prob=0.0)


def parse(arg: str | None, **own) -> ml_collections.ConfigDict:
  """The common arguments plus a config's ``own`` (name=default) arguments."""
  arg = cu.parse_arg(arg, **COMMON, **own)
  cu.choose("tier", arg.tier, dict.fromkeys(TIERS))
  return arg


def tier(arg) -> str:
  """The tier that applies: the embedded faces always take the small 'quick' models;
  ``auto`` is the CPU tier on a CPU-only machine and the papers' sizes elsewhere."""
  if arg.data == "synthetic":
    return "quick"
  if arg.tier == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "full"
  return arg.tier


def finish(config: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Applies the common arguments to a config built from the method's own."""
  quick = tier(arg) == "quick" and arg.data != "synthetic"
  config.seed = arg.seed
  if arg.name:
    config.name = arg.name
  for name in config.phases:
    phase = config[name]
    if quick:
      cap = QUICK_CONTRASTIVE_EPOCHS if phase.plugin == "moco" else QUICK_EPOCHS
      phase.epochs = min(phase.epochs, cap)
    if arg.epochs:
      phase.epochs = arg.epochs
    if arg.steps:
      phase.steps = arg.steps
    if arg.smoke:
      cu.smoke_phase(phase)
  if quick:
    config.augment.update(QUICK_AUGMENT)
  if arg.teacher_checkpoint and distils_teacher(config):
    config.teacher.checkpoint = arg.teacher_checkpoint
  return config


def distils_teacher(config) -> bool:
  """Whether a later phase distils a phase named 'teacher' (so can reuse a trained one)."""
  return "teacher" in config.phases and any(
      config[p].teacher == "teacher" for p in config.phases if p != "teacher")
