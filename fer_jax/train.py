"""Training and evaluation: runs a config's phases in order and reports the results.

A config names its phases (``config.phases``, e.g. ``('teacher', 'student')``)
and describes each in ``config[<phase>]`` (``config_utils.PhaseConfig``). The
whole config is parsed and every phase set up (``fer_jax.phase``) before
anything trains, so a config mistake stops the run before the first compile.
Then each phase in turn is fitted (``fer_jax.fit``) or, with ``checkpoint``,
loaded from a model directory, evaluated (``fer_jax.evaluate``), and saved as
a model directory ``<workdir>/<phase>/model`` (``fer_jax.model_dir``) that
later phases, ``fer_jax.load`` and the export read. Results go to
``<workdir>/results.json`` (flat ``"<phase>/<split>/<metric>"``),
``<workdir>/report.md``, ``<workdir>/details.json`` and ``<workdir>/metrics.jsonl``.
"""
import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from fer_jax import config_utils
from fer_jax import evaluate as evaluate_lib
from fer_jax import fit as fit_lib
from fer_jax import model_dir
from fer_jax import phase as phase_lib
from fer_jax import report
from fer_jax import steps
from fer_jax.data import DATASETS, as_arrays, streaming
from fer_jax.tools import count as count_lib


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_workdir(workdir: str) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: on a shared filesystem they must not race on one file.
    probe = path / f".write_probe.{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise SystemExit(f"workdir {workdir!r} cannot be written: {e.strerror or e}") from e
  return path


def _fits_in_memory(split, limit_mb: float) -> bool:
  example = streaming.numeric_fields(split[0])
  return len(split) * sum(v.nbytes for v in example.values()) <= limit_mb * 2**20


def _open_dataset(data_cfg):
  """The dataset ``data_cfg`` names; a dataset or split it lacks is a ConfigError naming
  the config field."""
  if data_cfg.name not in DATASETS:
    raise config_utils.ConfigError(f"config.data.name: unknown dataset {data_cfg.name!r}; "
                                   f"known: {', '.join(DATASETS.names())}")
  dataset = DATASETS.get(data_cfg.name)(data_cfg)
  for field in ("train_split", "eval_split", "test_split", "extra_test_splits"):
    named = data_cfg[field] if field == "extra_test_splits" else (data_cfg[field],)
    missing = sorted(set(named) - set(dataset.splits))
    if missing:
      raise config_utils.ConfigError(
          f"config.data.{field}: dataset {dataset.name!r} has no split {missing[0]!r}; "
          f"splits: {', '.join(dataset.splits)}")
  return dataset


def load_data(data_cfg):
  """The dataset and every split the config uses as numeric numpy arrays, except a
  training split over ``data_cfg.max_resident_mb``: that one stays a random-access
  split, and streams (``fer_jax.data.streaming``)."""
  dataset = _open_dataset(data_cfg)
  # Only numeric fields go to the accelerator (names and paths stay behind).
  arrays = {}
  for name in {data_cfg.train_split, data_cfg.eval_split, data_cfg.test_split,
               *data_cfg.extra_test_splits}:
    split = dataset.split(name)
    if name == data_cfg.train_split and not _fits_in_memory(split, data_cfg.max_resident_mb):
      arrays[name] = split
      continue
    a = streaming.numeric_fields(as_arrays(split))
    # The occlusion protocol keys each test image by its source row; a layout
    # without one (Kaggle folders: -1) falls back to the position in the split.
    if "index" not in a or np.any(a["index"] < 0):
      a["index"] = np.arange(len(a["label"]), dtype=np.int64)
    arrays[name] = a
  return dataset, arrays


def setup_phases(config, data: phase_lib.DataInfo, mesh) -> dict[str, phase_lib.PhaseProgram]:
  """Parses the config and sets up every phase (shapes only; nothing compiles)."""
  parsed = config_utils.parse(config)
  templates, programs = {}, {}
  for name, cfg in parsed.items():
    if cfg.checkpoint:
      templates[name] = model_dir.load(cfg.checkpoint)
      continue
    programs[name] = phase_lib.setup(config, name, cfg, data, mesh, templates)
    templates[name] = programs[name].template
  return programs


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  trained: model_dir.TrainedModel
  results: dict
  details: dict


def _train(program, data, arrays, config, trained, workdir, writer, evaluator):
  state, spec = phase_lib.initial_state(program, data, trained)
  replicated = steps.replicated(spec.mesh)
  train = arrays[config.data.train_split]
  train_data = (jax.device_put(train, replicated) if spec.device_resident else
                streaming.TrainStream(train, spec.mesh, spec.batch_size,
                                      seed=program.seed * 1000 + program.index))
  teacher_vars = (jax.device_put(trained[program.cfg.teacher].variables, replicated)
                  if program.teacher is not None else {})

  def validate(variables, step):
    values = evaluator.metrics(variables, config.data.eval_split)
    writer.write(phase=program.name, step=step, split=config.data.eval_split,
                 **{k: v for k, v in values.items() if k != "confusion"})
    return values["accuracy"]

  return fit_lib.fit(program, spec, state, train_data, teacher_vars, workdir / program.name,
                     writer, validate if program.cfg.evaluate else None)


def run_phase(name, program, config, data, arrays, mesh, trained, workdir, writer
              ) -> PhaseResult:
  """Fits (or loads) phase ``name``, saves its model directory and evaluates it."""
  cfg = config_utils.parse_phase(config, name)
  if program is None:
    model, fitted = model_dir.load(cfg.checkpoint), None
  else:
    evaluator = evaluate_lib.Evaluator(program.template, arrays, config.data, mesh,
                                       config.eval_batch_size)
    fitted = _train(program, data, arrays, config, trained, workdir, writer, evaluator)
    model = dataclasses.replace(program.template, variables=jax.device_get(fitted.variables))
    if jax.process_index() == 0:
      model.save(workdir / name / "model")
  size = count_lib.count(model.model, model.input_shape, num_classes=model.num_classes,
                         **model.model_kwargs)
  results = {"params": size["params"], "macs": size["macs"],
             "train_seconds": round(fitted.train_seconds, 1) if fitted else 0.0}
  details = {"best_step": fitted.best_step if fitted else 0, "confusion": {}}
  if cfg.evaluate:
    evaluator = evaluate_lib.Evaluator(model, arrays, config.data, mesh, config.eval_batch_size)
    values, details["confusion"] = evaluator.evaluate(
        jax.device_put(model.variables, steps.replicated(mesh)))
    results.update(values)
  return PhaseResult(model, {f"{name}/{k}": v for k, v in results.items()}, details)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every phase of ``config`` and writes results.json / report.md to ``workdir``."""
  mesh = make_mesh()
  dataset, arrays = load_data(config.data)
  data = phase_lib.DataInfo.of(dataset.class_names, arrays[config.data.train_split])
  programs = setup_phases(config, data, mesh)
  workdir = check_workdir(workdir)
  writer = fit_lib.MetricWriter(workdir / "metrics.jsonl")
  trained: dict[str, model_dir.TrainedModel] = {}
  results: dict[str, Any] = {}
  details: dict[str, Any] = {"class_names": list(dataset.class_names), "phases": {}}
  for name in config.phases:
    outcome = run_phase(name, programs.get(name), config, data, arrays, mesh, trained,
                        workdir, writer)
    trained[name] = outcome.trained
    results.update(outcome.results)
    details["phases"][name] = outcome.details
  results = dict(sorted(results.items()))
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "report.md").write_text(report.render(config, results, details))
    (workdir / "details.json").write_text(json.dumps(details) + "\n")
    print(f"{report.summary(config, results)}\nfull results: {workdir / 'report.md'}")
  return results


@dataclasses.dataclass(frozen=True)
class UntrainedPhase:
  program: phase_lib.PhaseProgram
  spec: steps.StepSpec
  state: dict
  model: model_dir.TrainedModel  # the initial variables, as a later phase's teacher
  teacher_variables: dict  # the (untrained) teacher's, {} without a teacher


def untrained_phases(config, data: phase_lib.DataInfo, mesh,
                     until: str | None = None) -> dict[str, UntrainedPhase]:
  """Every phase of ``config`` up to ``until``, set up and initialised, none trained.

  Each earlier phase serves, untrained, as the later ones' teacher or
  initialisation: what benchmarks and tests of a step need, since speed and
  program structure do not depend on trained weights.
  """
  programs = setup_phases(config, data, mesh)
  built, trained = {}, {}
  for name in config.phases[:list(config.phases).index(until) + 1 if until else None]:
    if name not in programs:  # a phase given as a trained model directory
      trained[name] = model_dir.load(config_utils.parse_phase(config, name).checkpoint)
      continue
    program = programs[name]
    state, spec = phase_lib.initial_state(program, data, trained)
    model = dataclasses.replace(program.template, variables=phase_lib.variables_of(state))
    teacher = trained[program.cfg.teacher].variables if program.teacher is not None else {}
    built[name] = UntrainedPhase(program, spec, state, model, teacher)
    trained[name] = model
  return built
