"""Is the input pipeline ever the bottleneck? Input paths against the train step.

On FER2013 (28,709 training images, 48x48x1) it measures images/s for:

  * device-resident input: a jitted ``sample_batch`` + ``augment`` (the
    input half of the fused step in ``fer_jax.steps``: the training set lives on
    the device, the batch is drawn and augmented there), with configs/mkd.py's
    augment config at ``--occlusion_prob``;
  * Grain streaming: ``fer_jax.data.streaming.batches`` over the
    ``tfds.data_source`` split, each host batch turned into global arrays with
    ``to_global``, for each ``--read_threads`` count (Grain's prefetch threads
    in ``ReadOptions``). The streamed step augments on the device, so these
    rows only deliver uint8 batches. ``streaming.batches`` takes no
    multiprocess worker count, so worker processes are not measured;
  * the consumers, built as ``fer_jax.fit`` builds them from
    ``configs/mkd.py`` (``data=fer2013``): the MKD student step (AFNet teacher
    forward, MobileNetV2 forward and backward, CE + KD + MKD, SGD update), the
    same step with ``augment`` swapped for the evaluation normalisation (the gap
    is augmentation's share of the step), and the AFNet teacher step.

The input paths run at ``--batch_size``, the steps at ``--step_batch_size``
(default: the same). At batch 128 the student step needs 11.6 GB of XLA:CPU
temporaries (the teacher step 2.7 GB), more than a small shared CPU host can
spare, so the CPU table times the steps at a smaller batch (its batch column).

Each row runs ``--warmup`` untimed batches (the first compiles), then up to
``--iters`` timed ones, each waited for; a row stops early, after
``MIN_TIMED_CALLS``, once it has used ``--max_row_seconds``. images/s = images
timed / seconds timed. The two student step variants are timed interleaved (one
batch each in turn), so a change in the host's load during the run does not
show up as augmentation cost. A ratio above 1 means the path delivers faster
than the step consumes. The streaming rows run alone here; in training, Grain's
threads share the host CPUs with the step (on a CPU backend they compete).

The table for the current backend is appended to ``--out`` under a heading
naming the backend, so tables from other machines accumulate in one file.

Usage (the commands behind input_pipeline.md):

  # CPU
  python experiments/benchmarks/input_pipeline.py --data_dir=~/tensorflow_datasets \\
      --step_batch_size=32
  # GPU
  python experiments/benchmarks/input_pipeline.py --data_dir=~/tensorflow_datasets
"""
import argparse
import contextlib
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time
from unittest import mock

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs import mkd
from experiments.hardware import cpu_model
from fer_jax import phase as phase_lib
from fer_jax import plugins
from fer_jax import steps
from fer_jax import train
from fer_jax.data import augment as augment_lib
from fer_jax.data import streaming
# pylint: enable=wrong-import-position

MIN_TIMED_CALLS = 3
STEP_NAMES = {"student": "MKD student step", "teacher": "AFNet teacher step"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--batch_size", type=int, default=128,
                      help="global batch; must be divisible by the device count")
  parser.add_argument("--step_batch_size", type=int, default=None,
                      help="the train steps' batch (default: --batch_size); smaller "
                           "where the steps' activations do not fit in memory")
  parser.add_argument("--iters", type=int, default=20, help="timed batches per row")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed batches per row, the compiling one included")
  parser.add_argument("--max_row_seconds", type=float, default=30.0,
                      help=f"stop timing a row after this long (at least "
                           f"{MIN_TIMED_CALLS} batches)")
  parser.add_argument("--occlusion_prob", type=float, default=0.5,
                      help="augment.occlusion_prob of every row (its cost is the same "
                           "for any value above 0: every image is occluded, then chosen)")
  parser.add_argument("--read_threads", type=lambda s: [int(n) for n in s.split(",")],
                      default=[0, 2, 16],
                      help="Grain ReadOptions.num_threads values, one streaming row each")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir of the built fer2013 (default: the fer2013 "
                           "preset's); built there from --manual_dir on first use")
  parser.add_argument("--manual_dir", default=None,
                      help="the FER2013 download (default: the preset's, relative to "
                           "the repository)")
  parser.add_argument("--out", default=str(HERE / "input_pipeline.md"),
                      help="markdown file the table is appended to")
  args = parser.parse_args(argv)
  args.step_batch_size = args.step_batch_size or args.batch_size
  if min([args.batch_size, args.step_batch_size, args.iters, args.warmup]) < 1:
    raise SystemExit("--batch_size, --step_batch_size, --iters and --warmup must be at "
                     "least 1")
  if min(args.read_threads) < 0:
    raise SystemExit(f"--read_threads must be counts >= 0, got {args.read_threads}")
  return args


def benchmark_config(args):
  """configs/mkd.py on FER2013 with the flags' batch, occlusion_prob and dirs."""
  config = mkd.get_config("data=fer2013")
  config.augment.occlusion_prob = args.occlusion_prob
  if args.data_dir:
    config.data.data_dir = args.data_dir
  manual_dir = pathlib.Path(args.manual_dir or config.data.manual_dir).expanduser()
  config.data.manual_dir = str(manual_dir if manual_dir.is_absolute() else REPO / manual_dir)
  for name in config.phases:
    config[name].batch_size = args.step_batch_size
  return config


# --- timing -------------------------------------------------------------------------


def time_paths(paths, args) -> list[dict]:
  """Times each path's ``next_batch()`` (returns when its batch is ready); a row each.

  ``paths`` are dicts with ``path`` (the row's name), ``batch``, ``next_batch``,
  optionally ``setup_s`` (compile time spent before the first call) and extra
  fields copied into the row. Several paths are timed interleaved, one batch
  each in turn, so a change of the host's load hits them alike.
  """
  firsts = []
  for path in paths:
    start = time.perf_counter()
    path["next_batch"]()
    firsts.append(path.get("setup_s", 0.0) + time.perf_counter() - start)
    for _ in range(args.warmup - 1):
      path["next_batch"]()
  times = [[] for _ in paths]
  while len(times[0]) < args.iters:
    for path, path_times in zip(paths, times):
      start = time.perf_counter()
      path["next_batch"]()
      path_times.append(time.perf_counter() - start)
    if (len(times[0]) >= MIN_TIMED_CALLS
        and sum(map(sum, times)) > args.max_row_seconds * len(paths)):
      break
  rows = []
  for path, first, path_times in zip(paths, firsts, times):
    row = {k: v for k, v in path.items() if k not in ("next_batch", "setup_s")}
    row.update(timed=len(path_times), first_s=first,
               images_per_s=path["batch"] * len(path_times) / sum(path_times),
               spread=(max(path_times) - min(path_times)) / statistics.median(path_times) / 2)
    print(f"{row['path']}: {row['images_per_s']:.1f} images/s (±{100 * row['spread']:.0f}%, "
          f"{row['timed']} batches, first call {first:.1f} s)", flush=True)
    rows.append(row)
  return rows


# --- the input paths ----------------------------------------------------------------


def device_resident_row(arrays, config, mesh, args) -> dict:
  """sample_batch + augment on the device-resident training set, as the fused step does."""
  batch_size, augment_config = args.batch_size, config.augment

  def draw(data, step, rng):
    batch = steps.sample_batch(data, step, rng, batch_size)
    images = jax.lax.with_sharding_constraint(batch["image"], steps.batch_sharded(mesh))
    return augment_lib.augment(jax.random.fold_in(rng, step), images, augment_config)

  draw = jax.jit(draw, in_shardings=steps.replicated(mesh),
                 out_shardings=steps.batch_sharded(mesh))
  data = jax.device_put(arrays, steps.replicated(mesh))
  rng = jax.device_put(jax.random.PRNGKey(0), steps.replicated(mesh))
  counter = iter(range(1 << 30))

  def next_batch():
    step = jax.device_put(np.int32(next(counter)), steps.replicated(mesh))
    draw(data, step, rng).block_until_ready()

  return time_paths([{"path": f"device-resident sample_batch + augment (occlusion_prob "
                              f"{augment_config.occlusion_prob})",
                      "batch": batch_size, "next_batch": next_batch}], args)[0]


def streaming_row(split, mesh, read_threads, args) -> dict:
  """Grain host batches of the data source, made global arrays."""
  batches = streaming.batches(split, global_batch_size=args.batch_size, seed=0,
                              read_options=grain.ReadOptions(num_threads=read_threads))

  def next_batch():
    jax.block_until_ready(streaming.to_global(next(batches), mesh))

  row = time_paths([{"path": f"Grain streaming + to_global, {read_threads} read threads",
                     "batch": args.batch_size, "next_batch": next_batch,
                     "prefetched": read_threads > 0}], args)[0]
  batches.close()
  return row


# --- the consumers ------------------------------------------------------------------


def _normalise_only(key, images, cfg=None):
  del key  # the no-op draws nothing
  return augment_lib.preprocess_eval(images, cfg)


def step_path(phase, arrays, augmented: bool) -> dict:
  """The phase's fused train step, compiled; without ``augmented``, augment only normalises."""
  replicated = steps.replicated(phase.spec.mesh)
  inputs = jax.device_put((phase.program.weights, phase.teacher_variables, arrays), replicated)
  state = [jax.tree.map(jnp.copy, phase.state)]  # the step donates it; keep the original
  swap = (contextlib.nullcontext() if augmented
          else mock.patch.object(plugins.augment_lib, "augment", _normalise_only))
  start = time.perf_counter()
  with swap:  # tracing reads plugins.augment_lib.augment
    step_fn = steps.make_train_step(phase.spec).lower(state[0], *inputs).compile()
  setup_s = time.perf_counter() - start

  def next_batch():
    state[0], metrics = step_fn(state[0], *inputs)
    metrics["loss"].block_until_ready()

  step = STEP_NAMES.get(phase.program.name, f"{phase.program.name} step")
  return {"path": f"{step}, {'augment' if augmented else 'no augment'}",
          "batch": phase.program.cfg.batch_size, "next_batch": next_batch, "setup_s": setup_s,
          "step": step, "augmented": augmented}


# --- report -------------------------------------------------------------------------


def _ratio(value: float) -> str:
  return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def render(rows, args, context) -> str:
  """The markdown section for this backend: setup lines, the table, augmentation's share."""
  consumers = [row for row in rows if row.get("augmented")]
  header = ["path", "batch", "images/s", "±", *[f"÷ {c['step']}" for c in consumers],
            "timed batches", "first call (s)"]
  lines = [f"## {context['backend']}: {context['device']}", "",
           f"* command: `{context['command']}`",
           f"* date: {context['date']}",
           f"* host CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); "
           f"{jax.device_count()} {context['backend']} device(s): {context['device']}",
           f"* jax {jax.__version__}, grain {grain.__version__}, "
           f"Python {platform.python_version()}",
           f"* XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '') or '(none)'}`",
           f"* load average (1 min) before / after: {context['load'][0]:.2f} / "
           f"{context['load'][1]:.2f}; total runtime {context['runtime']:.0f} s",
           f"* {args.warmup} untimed batches (compile included) then "
           f"up to {args.iters} timed ones per row, fewer where a row passed "
           f"{args.max_row_seconds:.0f} s; images/s = images / seconds over the timed "
           "batches; ± = half the (max - min) batch-time range over the median (none "
           "for Grain rows with read threads: their batches come from a prefetch buffer, "
           "in bursts); "
           "÷ columns: the path's images/s over that step's (> 1: the path keeps up)",
           "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for row in rows:
    ratios = [_ratio(row["images_per_s"] / c["images_per_s"]) for c in consumers]
    spread = "–" if row.get("prefetched") else f"{100 * row['spread']:.0f}%"
    lines.append(f"| {row['path']} | {row['batch']} | {row['images_per_s']:.1f} | "
                 f"{spread} | {' | '.join(ratios)} | {row['timed']} | "
                 f"{row['first_s']:.1f} |")
  lines.append("")
  standalone = rows[0]  # the device-resident sample_batch + augment
  for consumer in consumers:
    plain = [row for row in rows
             if row.get("step") == consumer["step"] and not row["augmented"]]
    if not plain:
      continue
    share = 1 - consumer["images_per_s"] / plain[0]["images_per_s"]
    lines.append(
        f"* augmentation's share of the {consumer['step']} time: {100 * share:.1f}% from the "
        f"no-augment step (1 - augment / no-augment images/s; compare the rows' ±), "
        f"{100 * consumer['images_per_s'] / standalone['images_per_s']:.2f}% from the "
        "standalone sample_batch + augment row (step images/s over its images/s)")
  return "\n".join(lines) + "\n"


def append_section(path: pathlib.Path, section: str) -> None:
  title = ("# Input pipeline throughput: is the input ever the bottleneck?\n\n"
           "Written by experiments/benchmarks/input_pipeline.py (see its docstring); one "
           "section per backend run, appended.\n")
  existing = path.read_text(encoding="utf-8") if path.exists() else title
  path.write_text(existing.rstrip("\n") + "\n\n" + section, encoding="utf-8")


def main(argv=None):
  args = parse_args(argv)
  started, load_before = time.time(), os.getloadavg()[0]
  config = benchmark_config(args)
  mesh = train.make_mesh()
  if args.batch_size % jax.device_count():
    raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices")
  dataset, arrays = train.load_data(config.data)
  train_arrays = arrays[config.data.train_split]

  rows = [device_resident_row(train_arrays, config, mesh, args)]
  split = dataset.split(config.data.train_split)
  rows += [streaming_row(split, mesh, n, args) for n in args.read_threads]
  data = phase_lib.DataInfo.of(dataset.class_names, train_arrays)
  phases = train.untrained_phases(config, data, mesh)
  teacher, student = phases["teacher"], phases["student"]
  # The student step is the main consumer: only its augmentation share is
  # measured, its two variants interleaved so load drift cannot fake a share.
  rows += time_paths([step_path(student, train_arrays, True),
                      step_path(student, train_arrays, False)], args)
  rows += time_paths([step_path(teacher, train_arrays, True)], args)

  context = dict(
      backend=jax.default_backend(),
      device=cpu_model() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind,
      command="python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
      date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      load=(load_before, os.getloadavg()[0]), runtime=time.time() - started)
  section = render(rows, args, context)
  print("\n" + section)
  append_section(pathlib.Path(args.out), section)


if __name__ == "__main__":
  main()
