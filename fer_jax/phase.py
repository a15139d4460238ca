"""A phase's setup: model, objective, optimizer, initial state and train step.

Setup is pure: it reads the parsed phase config (``config_utils.PhaseConfig``),
what the data provides (``DataInfo``) and the phases trained before it, and
returns a ``PhaseProgram``. Nothing here trains or writes. Every mistake a
config can make about the phase (an unknown model or model field, a loss term
reading a layer or batch field that is not there, a teacher that is not an
earlier phase) is a ``ConfigError`` raised here, before anything compiles.
The loop is ``fer_jax.fit``; evaluation is ``fer_jax.evaluate``.
"""
import dataclasses
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fer_jax import model_dir
from fer_jax import models
from fer_jax import objectives
from fer_jax import plugins
from fer_jax import steps
from fer_jax.config_utils import ConfigError, PhaseConfig
from fer_jax.data import streaming
from fer_jax.data.base import Split


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What setup needs to know of the data: classes, image shape and batch fields."""
  class_names: tuple[str, ...]
  train_size: int
  fields: Mapping[str, jax.ShapeDtypeStruct]  # one example's fields
  resident: bool = True  # the training set lives on the devices (else it streams)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.fields["image"].shape)

  @classmethod
  def of(cls, class_names, train: Mapping[str, np.ndarray] | Split) -> "DataInfo":
    """From the training arrays, or from a training split that streams (``load_data``)."""
    if isinstance(train, Mapping):
      example, size = {k: v[0] for k, v in train.items()}, len(train["label"])
    else:
      example, size = streaming.numeric_fields(train[0]), len(train)
    fields = {k: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype))
              for k, v in example.items()}
    return cls(tuple(class_names), size, fields, resident=isinstance(train, Mapping))


@dataclasses.dataclass(frozen=True)
class PhaseProgram:
  """Everything static about one phase, ready to initialise and step."""
  name: str
  index: int
  cfg: PhaseConfig
  seed: int
  template: model_dir.TrainedModel  # this phase's model, without variables
  teacher: model_dir.TrainedModel | None
  objective: objectives.Objective
  weights: Mapping[str, jax.Array]
  spec: steps.StepSpec
  total_steps: int
  steps_per_epoch: int

  @property
  def model(self) -> nn.Module:
    return self.spec.model


def build_model(cfg: PhaseConfig, num_classes: int, where: str) -> nn.Module:
  if cfg.model not in models.MODELS:
    raise ConfigError(f"{where}.model: unknown model {cfg.model!r}; known: "
                      f"{', '.join(models.MODELS.names())}")
  try:
    return models.build(cfg.model, num_classes=num_classes, **dict(cfg.model_kwargs))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}.model_kwargs: {e}") from None


# Tracing a full-size model takes seconds, and the phases of a run, or the rows of an
# experiment, ask again and again for the same few. Keyed by the module's repr, which
# lists every field (Linen modules with dict fields cannot be hashed).
_OUTPUT_SHAPES: dict[tuple, objectives.ModelOutput] = {}


def output_shapes(model: nn.Module, image_shape) -> objectives.ModelOutput:
  """The shapes of ``model``'s logits and aux on a batch of two (traced, not run)."""
  def forward(x):
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                           x, train=False)
    logits, aux = model.apply(variables, x, train=False)
    return objectives.ModelOutput(logits, dict(aux))
  key = (type(model), repr(model), tuple(image_shape))
  if key not in _OUTPUT_SHAPES:
    _OUTPUT_SHAPES[key] = jax.eval_shape(
        forward, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
  shapes = _OUTPUT_SHAPES[key]
  return objectives.ModelOutput(shapes.logits, dict(shapes.aux))


def make_optimizer(cfg: PhaseConfig, total_steps: int, params) -> optax.GradientTransformation:
  opt = cfg.optimizer
  warmup = min(int(opt.warmup_fraction * total_steps), total_steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.lr, max(warmup, 1), max(total_steps, 2), end_value=opt.lr * 0.01)
  decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)
  if opt.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=opt.momentum, nesterov=True))
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=decay_mask)
  else:
    raise ConfigError(f"optimizer.name must be sgd or adamw, got {opt.name!r}")
  if opt.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  if cfg.freeze:
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_frozen(path, cfg.freeze) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def _is_frozen(path, frozen_prefixes) -> bool:
  names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  # params are {'model': {...}, 'objective': {...}}: prefixes name model subtrees.
  return names[0] == "model" and len(names) > 1 and names[1] in frozen_prefixes


def _teacher(cfg: PhaseConfig, name: str, templates: Mapping[str, model_dir.TrainedModel],
             specs) -> model_dir.TrainedModel | None:
  if cfg.teacher and cfg.teacher not in templates:
    raise ConfigError(f"config.{name}.teacher={cfg.teacher!r} must name an earlier phase; "
                      f"earlier phases: {', '.join(templates) or '(none)'}")
  reading = objectives.reads_teacher(specs)
  if reading and not cfg.teacher:
    raise ConfigError(f"config.{name}: loss term(s) {', '.join(reading)} read the teacher, "
                      f"but config.{name}.teacher is empty; name an earlier phase")
  return templates[cfg.teacher] if reading else None


def _check_reads(name, specs, model, input_shape, teacher, plugin, data: DataInfo):
  student_layers = objectives.layers_available(output_shapes(model, input_shape))
  available = {"student": student_layers, "batch": sorted(data.fields),
               **plugin.sources(student_layers)}
  if teacher is not None:
    available["teacher"] = objectives.layers_available(
        output_shapes(teacher.module(), teacher.input_shape))
  objectives.check_reads(specs, available, f"config.{name}")


def template(cfg: PhaseConfig, data: DataInfo, augment_config, model: nn.Module
             ) -> model_dir.TrainedModel:
  """The phase's model as a TrainedModel without variables (its preprocessing included)."""
  return model_dir.TrainedModel(
      model=cfg.model, model_kwargs=dict(cfg.model_kwargs), class_names=data.class_names,
      variables=None, image_shape=data.image_shape,
      input_shape=tuple(cfg.input_shape or data.image_shape),
      mean=tuple(augment_config.mean), std=tuple(augment_config.std),
      num_va=getattr(model, "num_va", 0))


def setup(config, name: str, cfg: PhaseConfig, data: DataInfo, mesh,
          templates: Mapping[str, model_dir.TrainedModel]) -> PhaseProgram:
  """Builds phase ``name``; ``templates`` are the earlier phases' models."""
  where = f"config.{name}"
  model = build_model(cfg, len(data.class_names), where)
  specs = objectives.term_specs(cfg.terms, f"{where}.terms")
  teacher = _teacher(cfg, name, templates, specs)
  plugin = plugins.PLUGINS.get(cfg.plugin) if cfg.plugin in plugins.PLUGINS else None
  if plugin is None:
    raise ConfigError(f"{where}.plugin: unknown {cfg.plugin!r}; known: "
                      f"{', '.join(repr(p) for p in plugins.PLUGINS.names())}")
  try:
    plugin = plugin(**dict(cfg.plugin_kwargs))
  except TypeError as e:
    raise ConfigError(f"{where}.plugin_kwargs: {e}") from None
  if cfg.freeze and not cfg.init_from:
    # E.g. EmoNet's face-alignment network: frozen and random, it would leave the
    # head to learn from noise features.
    raise ConfigError(f"{where}.freeze={tuple(cfg.freeze)} keeps parameters that were never "
                      f"trained; set {where}.init_from to an earlier phase or a model directory "
                      f"(EmoNet: convert the official weights with fer_jax.convert.emonet_torch), "
                      f"or {where}.checkpoint to a trained model")
  own = template(cfg, data, config.augment, model)
  _check_reads(name, specs, model, own.input_shape, teacher, plugin, data)
  _check_batch_size(where, cfg.batch_size, data.train_size)
  if not 0.0 <= cfg.ema_decay < 1.0:
    raise ConfigError(f"{where}.ema_decay={cfg.ema_decay}: expected a decay in [0, 1) "
                      f"(0 keeps no moving average)")
  total = cfg.steps or math.ceil(cfg.epochs * data.train_size / cfg.batch_size)
  spec = steps.StepSpec(
      model=model, objective=objectives.Objective(specs), tx=None,
      augment_config=config.augment, batch_size=cfg.batch_size, mesh=mesh,
      teacher=teacher.module() if teacher else None,
      teacher_dtype=jnp.dtype(cfg.teacher_dtype), student_input=own.input_shape,
      teacher_input=teacher.input_shape if teacher else None, plugin=plugin,
      device_resident=data.resident, ema_decay=cfg.ema_decay)
  return PhaseProgram(
      name=name, index=list(config.phases).index(name), cfg=cfg, seed=config.seed,
      template=own, teacher=teacher, objective=spec.objective,
      weights=objectives.term_weights(cfg.terms), spec=spec, total_steps=total,
      steps_per_epoch=data.train_size // cfg.batch_size)


def _check_batch_size(where, batch_size, train_size):
  if batch_size % jax.device_count():
    raise ConfigError(f"{where}.batch_size={batch_size} must be divisible by the "
                      f"{jax.device_count()} devices")
  if train_size < batch_size:
    raise ConfigError(f"{where}.batch_size={batch_size} exceeds the {train_size} "
                      f"training examples")


def run_once(fn, *args):
  """Runs ``fn`` once as one program compiled without backend optimisation.

  Initialisation runs once; unoptimised code generation halves its compile time
  on XLA:CPU.
  """
  compiled = jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled(*args)


def _zero_inputs(spec: steps.StepSpec, data: DataInfo, variables, rng):
  """Zero-filled loss-term inputs of a batch of two, shaped as in the train step.

  The terms' parameters depend only on the shapes of their inputs; shapes are
  traced, not run op by op (eager Flax costs tens of seconds on CPU).
  """
  batch = {k: jax.ShapeDtypeStruct((2, *s.shape), s.dtype) for k, s in data.fields.items()}

  def inputs_of(batch, variables, rng):
    images, batch = spec.plugin.views(rng, batch, spec.augment_config)
    student_images = steps.adapt_input(images, spec.student_input)
    logits, aux = spec.model.apply(variables, student_images, train=False)
    student = objectives.ModelOutput(logits, dict(aux))
    plugin_state = spec.plugin.init_state(rng, variables, student)
    inputs = {"batch": batch, "student": student,
              **spec.plugin.inputs(plugin_state, spec.model, student_images, rng)}
    if spec.teacher is not None:
      t_images = steps.adapt_input(images, spec.teacher_input)
      t_vars = spec.teacher.init({"params": rng, "dropout": rng}, t_images, train=False)
      inputs["teacher"] = objectives.ModelOutput(
          *spec.teacher.apply(t_vars, t_images, train=False))
    return inputs

  shapes = jax.eval_shape(inputs_of, batch, variables, rng)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _copy_matching(target, source, where):
  """Copies ``source`` leaves into ``target``; both must have the same structure."""
  t_struct, s_struct = jax.tree.structure(target), jax.tree.structure(source)
  if t_struct != s_struct:
    raise ConfigError(f"{where}: cannot initialise from a model with a different structure "
                      f"({s_struct.num_leaves} leaves vs {t_struct.num_leaves})")
  return jax.tree.map(lambda t, s: jnp.asarray(s, t.dtype).reshape(t.shape), target, source)


def _initialise_from(program: PhaseProgram, variables: dict,
                     trained: Mapping[str, model_dir.TrainedModel]) -> dict:
  """``variables`` with ``init_from``'s (an earlier phase or a model directory) copied in."""
  source, into = program.cfg.init_from, program.cfg.init_into
  if not source:
    return variables
  src = (trained[source] if source in trained else model_dir.load(source)).variables
  where = f"config.{program.name}.init_from={source!r}"
  for collection in ("params", "batch_stats"):
    if collection not in src:
      continue
    tree = dict(variables[collection])
    if into:
      tree[into] = _copy_matching(tree[into], src[collection], where)
    else:
      tree = _copy_matching(tree, src[collection], where)
    variables[collection] = tree
  return variables


def initial_state(program: PhaseProgram, data: DataInfo,
                  trained: Mapping[str, model_dir.TrainedModel]) -> tuple[dict, steps.StepSpec]:
  """The train state at step 0 (on the mesh) and the step spec with its optimizer."""
  rng = jax.random.PRNGKey(program.seed + 1000 * program.index)
  init_rng, obj_rng, state_rng = jax.random.split(rng, 3)
  spec = program.spec
  x = jnp.zeros((2, *program.template.input_shape), jnp.float32)
  variables = run_once(lambda r: spec.model.init({"params": r, "dropout": r}, x, train=False),
                       init_rng)
  variables = _initialise_from(program, dict(variables), trained)
  inputs = _zero_inputs(spec, data, variables, state_rng)
  objective_vars = run_once(lambda r, i: spec.objective.init(r, i, True), obj_rng, inputs)
  params = {"model": variables["params"], "objective": objective_vars.get("params", {})}
  tx = make_optimizer(program.cfg, program.total_steps, params)
  state = {"step": jnp.int32(0), "rng": state_rng, "params": params,
           "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params),
           **spec.plugin.init_state(state_rng, variables, inputs["student"])}
  if spec.ema_decay:
    # A copy: the step donates its state, and an alias would be one buffer donated twice.
    state["averaged"] = jax.tree.map(jnp.copy, variables_of(state))
  return (jax.device_put(state, steps.replicated(spec.mesh)),
          dataclasses.replace(spec, tx=tx))


def variables_of(state) -> dict:
  """The model's variables: their moving average when the phase keeps one."""
  if "averaged" in state:
    return state["averaged"]
  return {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
