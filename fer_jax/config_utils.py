"""Config helpers: big_vision-style config arguments (``configs/mkd.py:smoke,seed=1``)."""
import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=2"`` into a ConfigDict over ``defaults``; bare words set True.

  Values take the type of their default, so ``smoke`` and ``seed=1`` work and an
  unknown argument is an error naming the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[name]
    if not value:
      result[name] = True
    elif isinstance(default, bool):
      result[name] = value.lower() in ("1", "true", "yes")
    else:
      result[name] = type(default)(value)
  return result


def data_config(name: str = "synthetic", smoke: bool = False) -> ml_collections.ConfigDict:
  """The ``config.data`` block for a named dataset preset.

  ``synthetic``: the embedded procedural faces (no download). ``fer2013`` and
  ``ferplus``: built from ``manual_dir`` (default: ../shared/data beside the
  checkout) into ``data_dir`` on first use; see docs/datasets.md.
  """
  occlusion_kinds = ("eyes", "mouth", "blocks", "hand")
  if name == "synthetic":
    cfg = dict(name="synthetic_faces", seed=0, split_sizes={}, train_split="train",
               eval_split="validation", test_split="test")
    if smoke:
      cfg["split_sizes"] = {"train": 256, "validation": 64, "test": 64}
  elif name == "fer2013":
    cfg = dict(name="fer2013", manual_dir="../shared/data/fer2013", data_dir="~/tensorflow_datasets",
               train_split="train", eval_split="public_test", test_split="private_test")
  elif name == "ferplus":
    cfg = dict(name="ferplus", manual_dir="../shared/data", data_dir="~/tensorflow_datasets",
               label_mode="majority", train_split="train", eval_split="validation",
               test_split="test", extra_test_splits=("test_occlusion", "test_pose30",
                                                     "test_pose45"))
  else:
    raise ValueError(f"unknown data preset {name!r}; known: synthetic, fer2013, ferplus")
  cfg.setdefault("extra_test_splits", ())
  cfg.update(occlusion_kinds=occlusion_kinds, occlusion_seed=0)
  return ml_collections.ConfigDict(cfg)


def optimizer_config(name: str = "sgd", lr: float = 0.05, weight_decay: float = 5e-4,
                     **extra) -> ml_collections.ConfigDict:
  cfg = dict(name=name, lr=lr, weight_decay=weight_decay, momentum=0.9, warmup_fraction=0.05,
             clip_norm=0.0)
  cfg.update(extra)
  return ml_collections.ConfigDict(cfg)


def phase_config(model: str, model_kwargs: dict, terms: dict, *, epochs: float,
                 batch_size: int, optimizer: ml_collections.ConfigDict, teacher: str = "",
                 **extra) -> ml_collections.ConfigDict:
  """One phase: a model trained on a weighted sum of loss terms (fer_jax.objectives)."""
  cfg = dict(model=model, model_kwargs=model_kwargs, terms=terms, epochs=epochs, steps=0,
             batch_size=batch_size, optimizer=optimizer, teacher=teacher, checkpoint="",
             init_from="", init_into="", freeze=(), teacher_dtype="float32",
             eval_every_epochs=1.0, checkpoint_every_steps=0, log_every_steps=10,
             evaluate=True, contrastive=False)
  cfg.update(extra)
  return ml_collections.ConfigDict(cfg)


def smoke_phase(phase: ml_collections.ConfigDict, steps: int = 6) -> None:
  """Shrinks a phase to a few steps for the ``smoke`` argument."""
  phase.steps = steps
  phase.batch_size = 16
  phase.eval_every_epochs = 1e9  # evaluate only at the end
  phase.log_every_steps = 1
