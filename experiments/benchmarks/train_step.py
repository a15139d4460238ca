r"""Compile time and step time of every phase's fused train step, for any config.

For each phase of the config it builds the trainer's own step
(``train.untrained_phases``), lowers and compiles it, then times ``--steps``
steps after one warm-up step. A phase's teacher is its config's teacher with
freshly initialised weights: speed does not depend on them.

``--variants`` repeats the measurement of one phase with some of its loss terms
removed, to show what each term costs (the teacher's forward goes when no term
reads the teacher). ``--overrides`` times one phase under several sets of config
overrides instead (``;`` between the cases, ``,`` between one case's
``path=value`` pairs). Every case is compiled first, then timed in ``--rounds``
interleaved rounds of ``--steps / --rounds`` steps: on shared cores the load
drifts more over a minute than a loss term costs.

Usage (the commands behind train_step.md; a few minutes each on 2 idle cores):

  python experiments/benchmarks/train_step.py --config=configs/mkd.py
  python experiments/benchmarks/train_step.py --config=configs/mkd.py --phase=student \
      --variants="ce;ce,kd;ce,kd,mkd" --steps=40 --rounds=5
  python experiments/benchmarks/train_step.py --config=configs/mkd.py --phase=student \
      --overrides="student.teacher_dtype='float32';student.teacher_dtype='bfloat16'" \
      --steps=40 --rounds=5
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \
      python experiments/benchmarks/train_step.py --config=configs/mkd.py

The config is read as by fer_jax.main, so ``:arg`` and ``--config.x=y``
overrides work (e.g. ``--config.student.batch_size=128``).
"""
import ast
import datetime
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import hardware  # noqa: E402
from fer_jax import cli, objectives, steps, train  # noqa: E402
from fer_jax import phase as phase_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run: other scripts import the timing."""
  config_flags.DEFINE_config_file("config", None, "Training config file.")
  flags.DEFINE_string("phase", "", "One phase (default: every phase).")
  flags.DEFINE_string("variants", "", "';'-separated term lists for --phase, e.g. 'ce;ce,kd'.")
  flags.DEFINE_string("overrides", "", "';'-separated cases of ','-separated config "
                      "overrides for --phase, e.g. 'student.model_kwargs.width=8;...=9'.")
  flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up step.")
  flags.DEFINE_integer("rounds", 1, "Interleaved rounds the timed steps are split into.")
  flags.DEFINE_string("out", "", "Append the markdown table to this file.")
  flags.mark_flags_as_required(["config"])


def compiled_phase(config, name: str):
  """(compiled step, state, step inputs, compile seconds, batch) of phase ``name``."""
  dataset, arrays = train.load_data(config.data)
  mesh = train.make_mesh()
  data = phase_lib.DataInfo.of(dataset.class_names, arrays[config.data.train_split])
  phase = train.untrained_phases(config, data, mesh, until=name)[name]
  inputs = (jax.device_put(phase.program.weights, steps.replicated(mesh)),
            jax.device_put(phase.teacher_variables, steps.replicated(mesh)),
            jax.device_put(arrays[config.data.train_split], steps.replicated(mesh)))
  start = time.perf_counter()
  step_fn = steps.make_train_step(phase.spec).lower(phase.state, *inputs).compile()
  return (step_fn, phase.state, inputs, time.perf_counter() - start,
          phase.program.cfg.batch_size)


def run_steps(step_fn, state, inputs, num_steps: int):
  """(state, seconds of each step): ``num_steps`` synchronised steps."""
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, *inputs)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, times


def time_phases(cases: list[tuple], num_steps: int, rounds: int = 1) -> list[dict]:
  """Compile seconds and median step seconds of each ``(config, phase name)``.

  All are compiled and warmed up first; then ``rounds`` rounds each run every case
  for ``num_steps // rounds`` steps in turn.
  """
  compiled = [list(compiled_phase(config, name)) for config, name in cases]
  times = [[] for _ in cases]
  for case in compiled:
    case[1], _ = run_steps(case[0], case[1], case[2], 1)  # warm-up
  for _ in range(rounds):
    for case, case_times in zip(compiled, times):
      case[1], seconds = run_steps(case[0], case[1], case[2], max(1, num_steps // rounds))
      case_times += seconds
  return [{"compile_s": case[3], "step_s": statistics.median(t),
           "spread_s": (max(t) - min(t)) / 2, "batch": case[4]}
          for case, t in zip(compiled, times)]


def time_phase(config, name: str, num_steps: int) -> dict:
  """Compile seconds and median step seconds of phase ``name``."""
  return time_phases([(config, name)], num_steps)[0]


def with_terms(config, phase: str, keep: list[str]):
  """``config`` with phase ``phase`` trained on the terms ``keep`` only."""
  config = config.copy_and_resolve_references()
  unknown = set(keep) - set(config[phase].terms)
  if unknown:
    raise ValueError(f"--variants names terms {sorted(unknown)} that {phase} does not have; "
                     f"it has {sorted(config[phase].terms)}")
  config[phase].terms = {k: v for k, v in config[phase].terms.items() if k in keep}
  if not objectives.reads_teacher(objectives.term_specs(config[phase].terms)):
    config[phase].teacher = ""
  return config


def with_overrides(config, overrides: str):
  """``config`` with each ``dotted.path=value`` of the ','-separated ``overrides`` set
  (values read as Python literals, else as strings)."""
  config = config.copy_and_resolve_references()
  for item in overrides.split(","):
    path, _, text = item.partition("=")
    *parents, leaf = path.strip().split(".")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    try:
      for part in parents:
        node = node[part]
      if leaf not in node:  # an unlocked ConfigDict would add it silently
        raise KeyError(f"no field {leaf!r}")
      node[leaf] = value
    except (KeyError, TypeError) as e:
      # A locked ConfigDict's message goes on to list every field of the node.
      reason = str(e).split(" Other fields")[0]
      raise app.UsageError(f"--overrides: cannot set {path.strip()}={text}: {reason}") from e
  return config


def cases_of(config) -> list[tuple[str, object, str]]:
  """(label, config, phase) of each case the flags ask for."""
  if (FLAGS.variants or FLAGS.overrides) and not FLAGS.phase:
    raise app.UsageError("--variants and --overrides need --phase")
  if FLAGS.variants and FLAGS.overrides:
    raise app.UsageError("give --variants or --overrides, not both")
  if FLAGS.variants:
    return [(f"{FLAGS.phase} [{'+'.join(v.split(','))}]",
             with_terms(config, FLAGS.phase, v.split(",")), FLAGS.phase)
            for v in FLAGS.variants.split(";")]
  if FLAGS.overrides:
    return [(f"{FLAGS.phase} [{case}]", with_overrides(config, case), FLAGS.phase)
            for case in FLAGS.overrides.split(";")]
  return [(name, config, name) for name in ([FLAGS.phase] if FLAGS.phase else config.phases)]


def main(argv):
  del argv
  config = FLAGS.config
  cases = cases_of(config)
  rows = []
  results = time_phases([(cfg, name) for _, cfg, name in cases], FLAGS.steps, FLAGS.rounds)
  for (label, cfg, name), result in zip(cases, results):
    rows.append((label, cfg[name].model, result))
    print(f"{label}: {result}", flush=True)

  lines = [
      f"### `{config.get('name', 'config')}` {datetime.date.today()}",
      "",
      f"`python experiments/benchmarks/train_step.py {' '.join(sys.argv[1:])}` on "
      f"{hardware.describe()}, jax {jax.__version__}, "
      f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '') or '(none)'}`, "
      f"load average {os.getloadavg()[0]:.1f} at the end.",
      "",
      f"| phase | model | batch | compile s | step s (median of {FLAGS.steps}, "
      f"{FLAGS.rounds} round{'s' if FLAGS.rounds > 1 else ''}) | img/s |",
      "|---|---|---|---|---|---|",
  ]
  for label, model, r in rows:
    lines.append(f"| {label} | {model} | {r['batch']} | {r['compile_s']:.1f} | "
                 f"{r['step_s']:.3f} ± {r['spread_s']:.3f} | {r['batch'] / r['step_s']:.0f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
