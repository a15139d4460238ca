"""The config layer: config arguments, presets, and one typed parse of every phase.

Config files build ``ml_collections.ConfigDict``s with the helpers here; the
trainer reads them only through ``parse``, which turns each phase into a
frozen ``PhaseConfig``. The dataclasses' field defaults are the only defaults:
``phase_config`` fills a ConfigDict from them, so a config file shows every
field, and ``parse`` rejects any key they do not name. Every config mistake
raises ``ConfigError``, which the command line prints as one line (exit
status 2).
"""
import dataclasses
from typing import Any, Mapping

import ml_collections

# Top-level fields of a config besides its phases.
TOP_LEVEL_FIELDS = ("name", "seed", "data", "augment", "eval_batch_size", "phases")


class ConfigError(ValueError):
  """A mistake in a config or its command line; names the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """SGD (Nesterov) or AdamW with linear warm-up then cosine decay to 1 % of ``lr``."""
  name: str = "sgd"
  lr: float = 0.05
  weight_decay: float = 5e-4
  momentum: float = 0.9
  warmup_fraction: float = 0.05
  clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  """One phase: a model trained on a weighted sum of loss terms (fer_jax.objectives).

  Attributes:
    model: registered model name; ``model_kwargs`` its constructor fields.
    terms: ``{term name: {kind, weight, fields...}}``.
    epochs: training length, unless ``steps`` > 0 gives it in steps.
    teacher: an earlier phase whose trained model is frozen and read by the terms.
    checkpoint: a trained model directory to load instead of training.
    init_from: an earlier phase (or a model directory) to initialise from;
      ``init_into`` names the parameter subtree it fills (all when empty).
    freeze: model parameter subtrees that do not train.
    teacher_dtype: dtype of the teacher's forward pass.
    input_shape: the model's (H, W, C) when it differs from the data's.
    plugin: a step plug-in (``fer_jax.plugins``; 'moco' for contrastive
      phases), configured by ``plugin_kwargs``.
    ema_decay: when > 0, the step also keeps an exponential moving average of
      the model's variables (weights and BN statistics), and the average is
      what is validated, selected, saved and exported; 0 keeps none.
  """
  model: str
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  terms: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  epochs: float = 1.0
  steps: int = 0
  batch_size: int = 128
  optimizer: OptimizerConfig = OptimizerConfig()
  teacher: str = ""
  checkpoint: str = ""
  init_from: str = ""
  init_into: str = ""
  freeze: tuple[str, ...] = ()
  teacher_dtype: str = "float32"
  eval_every_epochs: float = 1.0
  checkpoint_every_steps: int = 0
  log_every_steps: int = 10
  evaluate: bool = True
  input_shape: tuple[int, ...] = ()
  plugin: str = ""
  plugin_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  ema_decay: float = 0.0


def _plain(value):
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


def _fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def build(cls, values: Mapping[str, Any], where: str):
  """``cls(**values)`` with unknown or missing keys reported as a ConfigError at ``where``."""
  values = dict(values)
  unknown = sorted(set(values) - set(_fields(cls)))
  if unknown:
    raise ConfigError(f"{where}: unknown field {unknown[0]!r}; known: "
                      f"{', '.join(_fields(cls))}")
  try:
    return cls(**values)
  except TypeError as e:
    raise ConfigError(f"{where}: {e}") from None


def parse_phase(config, name: str) -> PhaseConfig:
  """``config[name]`` as a PhaseConfig."""
  if name not in config:
    raise ConfigError(f"config.phases names {name!r}, but config.{name} does not exist")
  values = _plain(config[name])
  if "optimizer" in values:
    values["optimizer"] = build(OptimizerConfig, values["optimizer"], f"config.{name}.optimizer")
  return build(PhaseConfig, values, f"config.{name}")


def parse(config) -> dict[str, PhaseConfig]:
  """Every phase of ``config`` in order; rejects unknown top-level fields."""
  phases = tuple(config.get("phases", ()))
  if not phases:
    raise ConfigError("config.phases is empty; name at least one phase")
  unknown = sorted(set(config.keys()) - set(TOP_LEVEL_FIELDS) - set(phases))
  if unknown:
    raise ConfigError(f"config: unknown field {unknown[0]!r}; known: "
                      f"{', '.join((*TOP_LEVEL_FIELDS, *phases))}")
  return {name: parse_phase(config, name) for name in phases}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=2"`` into a ConfigDict over ``defaults``; bare words set True.

  Values take the type of their default, so ``smoke`` and ``seed=1`` work and an
  unknown argument is an error naming the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise ConfigError(f"unknown config argument {name!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[name]
    if not value:
      result[name] = True
    elif isinstance(default, bool):
      result[name] = value.lower() in ("1", "true", "yes")
    else:
      try:
        result[name] = type(default)(value)
      except ValueError:
        raise ConfigError(f"config argument {name}={value!r}: expected a "
                          f"{type(default).__name__}") from None
  return result


def choose(arg_name: str, value: str, choices: Mapping[str, Any]):
  """``choices[value]``, or a ConfigError naming the argument and the choices."""
  if value not in choices:
    raise ConfigError(f"config argument {arg_name}={value!r}; known: {', '.join(choices)}")
  return choices[value]


def data_config(name: str = "synthetic", smoke: bool = False) -> ml_collections.ConfigDict:
  """The ``config.data`` block for a named dataset preset.

  ``synthetic``: the embedded procedural faces (no download). ``fer2013`` and
  ``ferplus``: built from ``manual_dir`` (default: ../shared/data beside the
  checkout) into ``data_dir`` on first use; ``affectnet``: the public
  AffectNet layout under ``manual_dir`` (see docs/datasets.md).
  """
  presets = {
      "synthetic": dict(name="synthetic_faces", seed=0, split_sizes={}, train_split="train",
                        eval_split="validation", test_split="test"),
      "fer2013": dict(name="fer2013", manual_dir="../shared/data/fer2013",
                      data_dir="~/tensorflow_datasets", train_split="train",
                      eval_split="public_test", test_split="private_test"),
      "ferplus": dict(name="ferplus", manual_dir="../shared/data", data_dir="~/tensorflow_datasets",
                      label_mode="majority", train_split="train", eval_split="validation",
                      test_split="test",
                      extra_test_splits=("test_occlusion", "test_pose30", "test_pose45")),
      "affectnet": dict(name="affectnet", manual_dir="", data_dir="~/tensorflow_datasets",
                        train_split="train", eval_split="validation", test_split="validation"),
  }
  cfg = dict(choose("data", name, presets))
  if smoke and name == "synthetic":
    cfg["split_sizes"] = {"train": 256, "validation": 64, "test": 64}
  cfg.setdefault("extra_test_splits", ())
  # A training split larger than this streams through Grain instead of living on
  # the devices (AffectNet: 287 k faces at 224 px, 43 GB; FER2013: 66 MB).
  cfg.update(occlusion_kinds=("eyes", "mouth", "blocks", "hand"), occlusion_seed=0,
             max_resident_mb=4096.0)
  return ml_collections.ConfigDict(cfg)


def optimizer_config(name: str = "sgd", **fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dataclasses.asdict(build(OptimizerConfig, dict(name=name, **fields), "optimizer")))


def phase_config(model: str, model_kwargs: dict, terms: dict, **fields
                 ) -> ml_collections.ConfigDict:
  """A phase's ConfigDict with every PhaseConfig field (defaults where not given)."""
  if "optimizer" in fields:
    fields["optimizer"] = build(OptimizerConfig, _plain(fields["optimizer"]), "optimizer")
  phase = build(PhaseConfig, dict(model=model, model_kwargs=model_kwargs, terms=terms, **fields),
                f"phase {model}")
  values = {f: getattr(phase, f) for f in _fields(PhaseConfig)}
  values["epochs"] = float(phase.epochs)  # ConfigDict fixes a field's type at its first value
  values["optimizer"] = ml_collections.ConfigDict(dataclasses.asdict(phase.optimizer))
  return ml_collections.ConfigDict(values)


def smoke_phase(phase: ml_collections.ConfigDict, steps: int = 6) -> None:
  """Shrinks a phase to a few steps for the ``smoke`` argument."""
  phase.steps = steps
  phase.batch_size = 16
  phase.eval_every_epochs = 1e9  # evaluate only at the end
  phase.log_every_steps = 1
