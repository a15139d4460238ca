"""Training and evaluation: runs a config's phases in order and reports the results.

A config names its phases (``config.phases``, e.g. ``('teacher', 'student')``)
and describes each in ``config[<phase>]``: the model, the loss terms, the
optimizer, and optionally a teacher (an earlier phase, frozen), parameters to
initialise from (an earlier phase or a checkpoint) and parameter subtrees to
freeze. Each phase trains with the fused step of ``fer_jax.steps``, selects its
best parameters on ``config.data.eval_split`` and is finally evaluated on the
test split, clean and under every synthetic occlusion. Results go to
``<workdir>/results.json`` (flat ``"<phase>/<split>/<metric>"``),
``<workdir>/report.md`` and ``<workdir>/metrics.jsonl``.
"""
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from fer_jax import checkpoint as checkpoint_lib
from fer_jax import metrics as metrics_lib
from fer_jax import models
from fer_jax import objectives
from fer_jax import report
from fer_jax import steps
from fer_jax.data import DATASETS, as_arrays
from fer_jax.tools import count as count_lib


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.enabled = jax.process_index() == 0

  def write(self, **record):
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_workdir(workdir: str) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise SystemExit(f"workdir {workdir!r} cannot be written: {e.strerror or e}") from e
  return path


def run_once(fn, *args):
  """Runs ``fn`` once as one program compiled without backend optimisation.

  Initialisation runs once; unoptimised code generation halves its compile time
  on XLA:CPU.
  """
  compiled = jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled(*args)


def build_model(phase_cfg, num_classes: int):
  return models.build(phase_cfg.model, num_classes=num_classes,
                      **dict(phase_cfg.get("model_kwargs", None) or {}))


def make_optimizer(phase_cfg, total_steps: int, params) -> optax.GradientTransformation:
  opt = phase_cfg.optimizer
  warmup = min(int(opt.get("warmup_fraction", 0.05) * total_steps), total_steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.lr, max(warmup, 1), max(total_steps, 2), end_value=opt.lr * 0.01)
  if opt.name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask(params)),
        optax.sgd(schedule, momentum=opt.get("momentum", 0.9), nesterov=True))
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=_decay_mask(params))
  else:
    raise ValueError(f"optimizer.name must be sgd or adamw, got {opt.name!r}")
  if opt.get("clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  frozen = tuple(phase_cfg.get("freeze", ()) or ())
  if frozen:
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_frozen(path, frozen) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def _path_names(path) -> list[str]:
  return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def _is_frozen(path, frozen_prefixes) -> bool:
  names = _path_names(path)
  # params are {'model': {...}, 'objective': {...}}: prefixes name model subtrees.
  return names[0] == "model" and len(names) > 1 and names[1] in frozen_prefixes


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


class Phase:
  """One training phase: builds the step, trains with checkpoints, evaluates."""

  def __init__(self, config, name: str, dataset, arrays: dict, mesh, workdir: pathlib.Path,
               writer: MetricWriter, finished: dict):
    self.config, self.name, self.mesh = config, name, mesh
    self.cfg = config[name]
    self.dataset, self.arrays = dataset, arrays
    self.workdir = workdir / name
    self.writer = writer
    self.num_classes = len(dataset.class_names)
    self.model = build_model(self.cfg, self.num_classes)
    self.input_shape = input_shape(self.cfg, arrays[config.data.train_split])
    # One predict program per phase serves validation, test and every occluded test.
    self._predict = steps.make_predict(self.model, config.augment, mesh, self.input_shape)
    teacher_name = self.cfg.get("teacher", "")
    if teacher_name and teacher_name not in finished:
      raise ValueError(f"{name}.teacher={teacher_name!r} must name an earlier phase; "
                       f"earlier phases: {', '.join(finished) or '(none)'}")
    self.teacher = finished[teacher_name] if teacher_name else None
    self.finished = finished
    self.specs = objectives.term_specs(self.cfg.terms)
    teacher_terms = [term for term, kind, _ in self.specs if objectives.reads_teacher(kind)]
    if teacher_terms and self.teacher is None:
      raise ValueError(f"{name}: loss term(s) {', '.join(teacher_terms)} read the teacher, "
                       f"but {name}.teacher is empty; name an earlier phase")
    self.objective = objectives.Objective(self.specs)
    self.weights = objectives.term_weights(self.cfg.terms)
    train_size = len(arrays[config.data.train_split]["label"])
    self.batch_size = self.cfg.batch_size
    if self.batch_size % jax.device_count():
      raise ValueError(f"{name}.batch_size={self.batch_size} must be divisible by the "
                       f"{jax.device_count()} devices")
    if train_size < self.batch_size:
      raise ValueError(f"{name}.batch_size={self.batch_size} exceeds the {train_size} "
                       f"training examples")
    steps_cfg = self.cfg.get("steps", 0)
    self.total_steps = steps_cfg or math.ceil(self.cfg.epochs * train_size / self.batch_size)
    self.steps_per_epoch = train_size // self.batch_size

  # --- initialisation --------------------------------------------------------

  def _dummy_images(self, batch, shape=None):
    return jnp.zeros((batch, *(shape or self.input_shape)), jnp.float32)

  def _dummy_batch(self, batch):
    train = self.arrays[self.config.data.train_split]
    return {k: jnp.zeros((batch, *v.shape[1:]), jax.dtypes.canonicalize_dtype(v.dtype))
            for k, v in train.items()}

  def check_layer_names(self):
    """Fails before compiling if a term addresses a layer a model does not have."""
    shapes = {"student": self._output_shapes(self.model, self._dummy_images(2))}
    if self.teacher is not None:
      shapes["teacher"] = self._output_shapes(
          self.teacher.model, self._dummy_images(2, self.teacher.input_shape))
    for term, who, layer in objectives.referenced_layers(self.specs):
      if who not in shapes:
        raise ValueError(f"{self.name}: loss term {term!r} reads teacher layer {layer!r} "
                         f"but the phase has no teacher")
      available = objectives.layers_available(shapes[who])
      if layer not in available:
        raise ValueError(f"{self.name}: loss term {term!r} reads {who} layer {layer!r}, "
                         f"which {self._model_name(who)} does not have; "
                         f"available: {', '.join(available)}")

  def _model_name(self, who):
    return self.cfg.model if who == "student" else self.teacher.cfg.model

  @staticmethod
  def _output_shapes(model, x):
    def forward(x):
      variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                             x, train=False)
      logits, aux = model.apply(variables, x, train=False)
      return objectives.ModelOutput(logits, dict(aux))
    return jax.eval_shape(forward, x)

  def init_state(self):
    rng = jax.random.PRNGKey(self.config.seed + 1000 * self.config.phases.index(self.name))
    init_rng, obj_rng, state_rng = jax.random.split(rng, 3)
    x = self._dummy_images(2)
    variables = run_once(lambda r: self.model.init({"params": r, "dropout": r}, x, train=False),
                         init_rng)
    variables = self._initialise_from(dict(variables))
    # The loss terms' parameters depend only on the shapes of the model outputs;
    # shapes are traced, not run op by op (eager Flax costs tens of seconds on CPU).
    zeros_like = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    student = zeros_like(self._output_shapes(self.model, x))
    teacher = (zeros_like(self._output_shapes(
        self.teacher.model, self._dummy_images(2, self.teacher.input_shape)))
               if self.teacher is not None else None)
    objective = self.objective
    batch = self._dummy_batch(2 * (2 if self.cfg.get("contrastive", False) else 1))
    if self.cfg.get("contrastive", False):
      double = lambda o: objectives.ModelOutput(
          jnp.concatenate([o.logits] * 2), jax.tree.map(
              lambda a: jnp.concatenate([a] * 2) if a.ndim else a, o.aux))
      student, teacher = double(student), double(teacher) if teacher is not None else None
      proj = student.aux["projection"]
      batch = dict(batch, moco_key=proj, moco_queue=jnp.zeros((8, proj.shape[-1])))
    objective_vars = run_once(lambda *args: objective.init(*args, True),
                              obj_rng, student, teacher, batch)
    params = {"model": variables["params"], "objective": objective_vars.get("params", {})}
    self.tx = make_optimizer(self.cfg, self.total_steps, params)
    state = {"step": jnp.int32(0), "rng": state_rng, "params": params,
             "batch_stats": variables.get("batch_stats", {}),
             "opt_state": self.tx.init(params)}
    if self.cfg.get("contrastive", False):
      dim = student.aux["projection"].shape[-1]
      queue = jax.random.normal(jax.random.fold_in(state_rng, 1), (self.cfg.queue_size, dim))
      state["queue"] = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True)
      state["queue_ptr"] = jnp.int32(0)
      # A copy: the step donates its state, and on one device an alias of the
      # online parameters would be the same buffer donated twice.
      state["ema"] = jax.tree.map(jnp.copy, {"params": variables["params"],
                                             "batch_stats": variables.get("batch_stats", {})})
    return jax.device_put(state, steps.replicated(self.mesh))

  def _initialise_from(self, variables):
    source = self.cfg.get("init_from", "")
    if not source:
      return variables
    if source not in self.finished:
      raise ValueError(f"{self.name}.init_from={source!r} must name an earlier phase")
    src = self.finished[source].variables
    into = self.cfg.get("init_into", "")
    for collection in ("params", "batch_stats"):
      if collection not in src:
        continue
      tree = dict(variables[collection])
      if into:
        tree[into] = _copy_matching(tree[into], src[collection], f"{self.name}.{into}")
      else:
        tree = _copy_matching(tree, src[collection], self.name)
      variables[collection] = tree
    return variables

  # --- training --------------------------------------------------------------

  def step_spec(self) -> steps.StepSpec:
    """The static description of this phase's train step (after ``init_state``)."""
    return steps.StepSpec(
        model=self.model, objective=self.objective, tx=self.tx,
        augment_config=self.config.augment, batch_size=self.batch_size, mesh=self.mesh,
        teacher=self.teacher.model if self.teacher else None,
        teacher_dtype=jnp.dtype(self.cfg.get("teacher_dtype", "float32")),
        student_input=self.input_shape,
        teacher_input=self.teacher.input_shape if self.teacher else None,
        contrastive=self.cfg.get("contrastive", False),
        ema_momentum=self.cfg.get("ema_momentum", 0.999))

  def finish(self, variables) -> "FinishedPhase":
    """This phase with ``variables``, usable as a later phase's teacher."""
    return FinishedPhase(self.cfg, self.model, variables, self.input_shape)

  def train(self):
    state = self.init_state()
    step_fn = steps.make_train_step(self.step_spec())
    ckpts = checkpoint_lib.Checkpoints(self.workdir / "checkpoints")
    best_ckpts = checkpoint_lib.Checkpoints(self.workdir / "best", max_to_keep=1)
    best = {"score": -1.0, "step": 0}
    latest = ckpts.latest_step()
    if latest is not None:
      state, meta = ckpts.restore(latest, state)
      best = meta["best"]
      logging.info("%s: resumed at step %d from %s", self.name, latest, ckpts.directory)
    best_ckpts.discard_after(latest or 0)
    train_data = jax.device_put(self.arrays[self.config.data.train_split],
                                steps.replicated(self.mesh))
    teacher_vars = self.teacher.variables if self.teacher else {}
    weights = jax.device_put(self.weights, steps.replicated(self.mesh))
    eval_every = max(1, int(self.cfg.get("eval_every_epochs", 1) * self.steps_per_epoch))
    ckpt_every = self.cfg.get("checkpoint_every_steps", 0) or eval_every
    start = int(state["step"])
    last_good = latest
    bar = tqdm.tqdm(total=self.total_steps, initial=start, desc=self.name, unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    pending = None
    t0 = time.time()
    try:
      for step in range(start, self.total_steps):
        state, metrics = step_fn(state, weights, teacher_vars, train_data)
        if pending is not None:
          self._check_and_log(*pending, last_good, bar)
        pending = (step, metrics)
        done = step + 1
        evaluate_now = done % eval_every == 0 or done == self.total_steps
        save_now = done % ckpt_every == 0 or done == self.total_steps
        if evaluate_now or save_now:
          # Never select or save parameters before their step is known to be finite.
          self._check_and_log(*pending, last_good, bar)
          pending = None
        if evaluate_now and self.cfg.get("evaluate", True):
          score = self.evaluate_split(self.variables_of(state), self.config.data.eval_split,
                                      step=done)["accuracy"]
          if score > best["score"]:
            best = {"score": score, "step": done}
            best_ckpts.save(done, self.variables_of(state), {"best": best})
        if save_now:
          ckpts.save(done, state, {"best": best, "phase": self.name,
                                   "config": self.config.to_json_best_effort()})
          last_good = done
      if pending is not None:
        self._check_and_log(*pending, last_good, bar)
    finally:
      # On an interruption (Ctrl-C, preemption, a non-finite loss) the saves in
      # flight still commit, so a restart resumes from the newest checkpoint.
      bar.close()
      ckpts.wait()
      best_ckpts.wait()
    self.train_seconds = time.time() - t0
    final = self.variables_of(state)
    if self.cfg.get("evaluate", True) and best_ckpts.latest_step() is not None:
      final, _ = best_ckpts.restore(best_ckpts.latest_step(), final)
    ckpts.close()
    best_ckpts.close()
    return final, best

  def variables_of(self, state):
    return {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}

  def _check_and_log(self, step, metrics, last_good, bar):
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      terms = ", ".join(f"{k[5:]}={float(v):.4g}" for k, v in metrics.items()
                        if k.startswith("loss/"))
      where = (f"the last good checkpoint is step {last_good} in {self.workdir / 'checkpoints'}"
               if last_good else "no checkpoint was written yet")
      raise FloatingPointError(
          f"{self.name}: non-finite loss or gradient at step {step + 1}: "
          f"loss={float(metrics['loss']):.4g} ({terms}); the update was not applied and "
          f"{where}. Lower the learning rate or a term's weight, or add optimizer.clip_norm.")
    bar.update(1)
    log_every = self.cfg.get("log_every_steps", 10)
    if (step + 1) % log_every == 0:
      shown = {"loss": f"{metrics['loss']:.3f}"}
      if "accuracy" in metrics:
        shown["acc"] = f"{metrics['accuracy']:.3f}"
      bar.set_postfix(shown)
      self.writer.write(phase=self.name, step=step + 1,
                        **{k: float(v) for k, v in metrics.items()})

  # --- evaluation ------------------------------------------------------------

  def predictions(self, variables, split: str):
    """Logits and V/A of ``split``, which may be a ``<split>_occluded_<kind>``."""
    if split not in self.arrays:
      self.arrays[split] = occluded_split(self.arrays, split, self.config, self.mesh)
    return predict_split(self._predict, variables, self.arrays[split],
                         self.config.eval_batch_size)

  def evaluate_split(self, variables, split, step=None) -> dict:
    logits, va = self.predictions(variables, split)
    arrays = self.arrays[split]
    result = metrics_lib.classification(arrays["label"], logits)
    if va.shape[-1] and "valence" in arrays:
      target = np.stack([arrays["valence"], arrays["arousal"]], -1)
      result.update(metrics_lib.valence_arousal(target, va))
    if step is not None:
      self.writer.write(phase=self.name, step=step, split=split,
                        **{k: v for k, v in result.items() if k != "confusion"})
    return result


def _padded_batches(arrays, batch_size, *fields):
  """Yields (count, padded arrays of ``fields``) over a split in whole batches."""
  n = len(arrays["label"])
  batch_size = math.ceil(batch_size / jax.device_count()) * jax.device_count()
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    yield stop - start, [np.concatenate([arrays[f][start:stop],
                                         np.zeros((pad, *arrays[f].shape[1:]), arrays[f].dtype)])
                         for f in fields]


def predict_split(predict, variables, arrays, batch_size):
  """Runs ``predict`` over a whole split in padded, sharded batches."""
  logits, va = [], []
  for count, (images,) in _padded_batches(arrays, batch_size, "image"):
    out = jax.device_get(predict(variables, images))
    logits.append(out[0][:count])
    va.append(out[1][:count])
  return np.concatenate(logits), np.concatenate(va)


def occluded_split(arrays, name: str, config, mesh) -> dict:
  """The split ``<split>_occluded_<kind>``: ``<split>`` under the fixed test occluder."""
  source, marker, kind = name.rpartition("_occluded_")
  if not marker or source not in arrays:
    raise KeyError(f"no split {name!r}; loaded: {', '.join(sorted(arrays))}")
  occlude = steps.make_occlude(mesh, kind, config.data.get("occlusion_seed", 0))
  images = [jax.device_get(occlude(img, idx))[:count] for count, (img, idx) in
            _padded_batches(arrays[source], config.eval_batch_size, "image", "index")]
  return dict(arrays[source], image=np.concatenate(images))


def _copy_matching(target, source, where):
  """Copies ``source`` leaves into ``target``; both must have the same structure."""
  t_struct, s_struct = jax.tree.structure(target), jax.tree.structure(source)
  if t_struct != s_struct:
    raise ValueError(f"{where}: cannot initialise from a model with a different structure "
                     f"({s_struct.num_leaves} leaves vs {t_struct.num_leaves})")
  return jax.tree.map(lambda t, s: jnp.asarray(s, t.dtype).reshape(t.shape), target, source)


def input_shape(phase_cfg, train_arrays) -> tuple[int, int, int]:
  """The model's input shape: the data's, unless the phase sets ``input_shape``."""
  return tuple(phase_cfg.get("input_shape", None) or train_arrays["image"].shape[1:])


class FinishedPhase:
  """A trained (or loaded) phase, usable as a teacher or an initialisation."""

  def __init__(self, cfg, model, variables, input_shape):
    self.cfg, self.model, self.variables = cfg, model, variables
    self.input_shape = input_shape


def untrained_phases(config, dataset, arrays, mesh, workdir: pathlib.Path,
                     until: str | None = None) -> dict[str, tuple[Phase, dict]]:
  """``{name: (phase, initial state)}`` for the phases of ``config`` up to ``until``.

  Each earlier phase serves, untrained, as the later ones' teacher or
  initialisation: what benchmarks and tests of a step need, since speed and
  program structure do not depend on trained weights.
  """
  writer = MetricWriter(workdir / "metrics.jsonl")
  finished, built = {}, {}
  for name in config.phases[:config.phases.index(until) + 1 if until else None]:
    phase = Phase(config, name, dataset, arrays, mesh, workdir, writer, finished)
    state = phase.init_state()
    finished[name] = phase.finish(phase.variables_of(state))
    built[name] = (phase, state)
  return built


def load_checkpoint_variables(path: str, like):
  ckpts = checkpoint_lib.Checkpoints(path)
  step = ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {path!r}")
  variables, _ = ckpts.restore(step, like)
  ckpts.close()
  return variables


def load_data(data_cfg):
  """The dataset and, as numpy arrays, every split the config uses."""
  dataset = DATASETS.get(data_cfg.name)(data_cfg)
  wanted = {data_cfg.train_split, data_cfg.eval_split, data_cfg.test_split,
            *data_cfg.get("extra_test_splits", ())}
  # Only numeric fields go to the accelerator (names and paths stay behind).
  arrays = {s: {k: v for k, v in as_arrays(dataset.split(s)).items() if v.dtype.kind in "biuf"}
            for s in wanted}
  for a in arrays.values():
    # The occlusion protocol keys each test image by its source row; a layout
    # without one (Kaggle folders: -1) falls back to the position in the split.
    if "index" not in a or np.any(a["index"] < 0):
      a["index"] = np.arange(len(a["label"]), dtype=np.int64)
  return dataset, arrays


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every phase of ``config`` and writes results.json / report.md to ``workdir``."""
  workdir = check_workdir(workdir)
  mesh = make_mesh()
  dataset, arrays = load_data(config.data)
  writer = MetricWriter(workdir / "metrics.jsonl")
  finished: dict[str, FinishedPhase] = {}
  results: dict[str, Any] = {}
  details: dict[str, Any] = {"class_names": dataset.class_names, "phases": {}}
  for name in config.phases:
    phase = Phase(config, name, dataset, arrays, mesh, workdir, writer, finished)
    phase.check_layer_names()
    results.update(_phase_results(config, phase, details))
    finished[name] = phase.finish(phase.final_variables)
  results = {k: v for k, v in sorted(results.items())}
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "report.md").write_text(report.render(config, results, details))
    (workdir / "details.json").write_text(json.dumps(details) + "\n")
    print(f"{report.summary(config, results)}\nfull results: {workdir / 'report.md'}")
  return results


def _phase_results(config, phase: Phase, details) -> dict:
  cfg = phase.cfg
  results = {}
  checkpoint = cfg.get("checkpoint", "")
  if checkpoint:
    like = phase.init_state()
    phase.final_variables = load_checkpoint_variables(checkpoint, phase.variables_of(like))
    phase.train_seconds = 0.0
    best = {"score": float("nan"), "step": 0}
  else:
    phase.final_variables, best = phase.train()
  size = count_lib.count(cfg.model, phase.input_shape, num_classes=phase.num_classes,
                         **dict(cfg.get("model_kwargs", None) or {}))
  results[f"{phase.name}/params"] = size["params"]
  results[f"{phase.name}/macs"] = size["macs"]
  results[f"{phase.name}/train_seconds"] = round(phase.train_seconds, 1)
  phase_details = {"best_step": best["step"], "confusion": {}}
  if cfg.get("evaluate", True):
    data = config.data
    results[f"{phase.name}/{data.eval_split}/accuracy"] = phase.evaluate_split(
        phase.final_variables, data.eval_split)["accuracy"]
    for split in (data.test_split, *data.get("extra_test_splits", ())):
      metrics = phase.evaluate_split(phase.final_variables, split)
      phase_details["confusion"][split] = metrics.pop("confusion")
      results.update({f"{phase.name}/{split}/{k}": v for k, v in metrics.items()})
    occluded = []
    for kind in data.get("occlusion_kinds", ()):
      metrics = phase.evaluate_split(phase.final_variables,
                                     f"{data.test_split}_occluded_{kind}")
      metrics.pop("confusion")
      occluded.append(metrics["accuracy"])
      results.update({f"{phase.name}/{data.test_split}_occluded_{kind}/{k}": v
                      for k, v in metrics.items()})
    if occluded:
      results[f"{phase.name}/{data.test_split}_occluded/accuracy"] = float(np.mean(occluded))
  details["phases"][phase.name] = phase_details
  return results
