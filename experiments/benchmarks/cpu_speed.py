"""CPU throughput (images/s) of fer_jax models against their PyTorch twins.

For every model and input it measures inference (eval mode, forward only) and
training (train-mode forward, backward, SGD-momentum update) at one batch
size. Three rows are timed:

  * JAX, ``jax.jit``, depthwise convs 'auto' (the shifted-slice form on CPU);
  * JAX with ``depthwise_impl='native'`` (grouped convolutions). Only for
    models that have the field;
  * PyTorch eager, the hand-written twin from torch_twins.py.

Each measurement runs in a fresh subprocess, pinned to the same CPUs. XLA
sizes its thread pool from the CPU affinity, and torch gets
``set_num_threads(len(cpus))``. A fresh process per run keeps one framework's
spinning worker threads from slowing the other. After ``--warmup`` calls
(the first one compiles) each run times ``--iters`` calls, one batch each,
synchronised per call. It reports batch / median time. Weights are random
draws of the right shapes, not the models' initialisers (compiling a JAX init
takes longer than the benchmark itself); speed does not depend on them.

``--explore_flags`` adds a table that times one model under several XLA_FLAGS
sets (``--models=`` skips the main table).

Usage (the command behind cpu_speed.md; about 12 minutes on 2 idle cores):

  python experiments/benchmarks/cpu_speed.py --out=experiments/benchmarks/cpu_speed.md
  python experiments/benchmarks/cpu_speed.py --models= --explore_flags
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MIN_TIMED_CALLS = 3
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from experiments.hardware import cpu_model  # noqa: E402

# Flag sets known to change XLA:CPU speed. thunk_runtime=false selected the old
# runtime in 2024-25 jaxlibs; newer ones accept it with a warning and ignore it.
XLA_FLAG_SETS = {
    "default": "",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
}


def parse_input(spec: str) -> dict:
  """'48x48x1:small' -> {'height': 48, 'width': 48, 'channels': 1, 'stem': 'small'}."""
  shape, _, stem = spec.partition(":")
  parts = shape.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--inputs entries must look like HxWxC[:stem], got {spec!r}")
  height, width, channels = map(int, parts)
  return dict(height=height, width=width, channels=channels, stem=stem or None)


# --- one measurement, in its own process --------------------------------------------


def _timed(step, cfg: dict) -> tuple[float, list[float]]:
  """Returns the first call's time and the timed calls' times.

  Timing stops early, after ``MIN_TIMED_CALLS``, once the timed calls have used
  ``max_run_seconds``. Only very slow rows stop early; the table shows their n.
  """
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(cfg["warmup"] - 1):
    step()
  times = []
  while len(times) < cfg["iters"]:
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    if len(times) >= MIN_TIMED_CALLS and sum(times) > cfg["max_run_seconds"]:
      break
  return first, times


def _random_leaf(rng, path, leaf):
  """A random array for a Flax variable, scaled as an initialiser would be."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  name = path[-1].key
  if name == "kernel":
    return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
  if name in ("scale", "var"):
    return np.ones(leaf.shape, np.float32)
  return np.zeros(leaf.shape, np.float32)


def run_jax(cfg: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from fer_jax import models  # pylint: disable=import-outside-toplevel

  fields = {"stem": cfg["stem"]} if cfg["stem"] else {}
  model = models.build(cfg["model"], num_classes=cfg["num_classes"], **fields)
  if cfg["impl"] != "auto":
    if not hasattr(model, "depthwise_impl"):
      return {"skipped": "no depthwise_impl field"}
    model = model.clone(depthwise_impl=cfg["impl"])
  rng = np.random.default_rng(0)
  x = rng.normal(size=(cfg["batch"], cfg["height"], cfg["width"], cfg["channels"])).astype(
      np.float32)
  labels = rng.integers(0, cfg["num_classes"], cfg["batch"])
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = jax.tree_util.tree_map_with_path(lambda p, l: _random_leaf(rng, p, l), shapes)
  x, labels, variables = jax.device_put((x, labels, variables))

  if cfg["mode"] == "inference":
    forward = jax.jit(lambda v, images: model.apply(v, images, train=False)[0])
    step = lambda: forward(variables, x).block_until_ready()
  else:
    tx = optax.sgd(0.01, momentum=0.9)

    def train_step(state, images, targets, key):
      params, batch_stats, opt_state = state

      def loss_fn(p):
        (logits, _), updates = model.apply(
            {"params": p, "batch_stats": batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, updates["batch_stats"]

      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    train_step = jax.jit(train_step, donate_argnums=0)
    state = [(variables["params"], variables["batch_stats"], tx.init(variables["params"]))]
    key = jax.random.key(1)

    def step():
      state[0], loss = train_step(state[0], x, labels, key)
      loss.block_until_ready()

  first, times = _timed(step, cfg)
  return {"first_call_s": first, "times": times, "iters": cfg["iters"], "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_torch(cfg: dict) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, HERE)
  import torch_twins  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(len(cfg["cpus"]))
  torch.set_num_interop_threads(1)
  if cfg["model"] not in torch_twins.TWINS:
    return {"skipped": "no PyTorch twin"}
  fields = {"stem": cfg["stem"]} if cfg["stem"] else {}
  model = torch_twins.TWINS[cfg["model"]](cfg["num_classes"], cfg["channels"],
                                          input_size=cfg["height"], **fields)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(
      size=(cfg["batch"], cfg["channels"], cfg["height"], cfg["width"])).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, cfg["num_classes"], cfg["batch"]))

  if cfg["mode"] == "inference":
    model.eval()

    def step():
      with torch.inference_mode():
        model(x)
  else:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
      optimizer.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(model(x), labels).backward()
      optimizer.step()

  first, times = _timed(step, cfg)
  return {"first_call_s": first, "times": times, "iters": cfg["iters"], "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


def worker(cfg: dict) -> dict:
  os.sched_setaffinity(0, cfg["cpus"])
  return run_jax(cfg) if cfg["framework"] == "jax" else run_torch(cfg)


# --- driver -------------------------------------------------------------------------


def measure(cfg: dict, xla_flags: str, script: str = __file__) -> dict:
  """Runs one configuration in a fresh pinned process of ``script --worker``; returns its
  result dict."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu",
             OMP_NUM_THREADS=str(len(cfg["cpus"])))
  proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(cfg)],
                        env=env, capture_output=True, text=True, check=False)
  lines = proc.stdout.strip().splitlines()
  # The 1-minute load average just after the run, a record of competing work.
  load = {"load": os.getloadavg()[0]}
  if "Unknown flag in XLA_FLAGS" in proc.stderr:
    return {"error": "flag unknown to this jaxlib", **load}
  if proc.returncode != 0 or not lines:
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:120], **load}
  return {**json.loads(lines[-1]), **load}


def images_per_s(result: dict, batch: int) -> float | None:
  return batch / statistics.median(result["times"]) if "times" in result else None


def cell(result: dict, batch: int) -> str:
  if "skipped" in result:
    return "n/a"
  if "times" not in result:
    return f"error: {result.get('error')}"
  times = result["times"]
  spread = (max(times) - min(times)) / statistics.median(times) / 2
  count = f", n={len(times)}" if len(times) < result["iters"] else ""
  return f"{images_per_s(result, batch):.1f} (±{100 * spread:.0f}%{count})"


def ratio(a: dict, b: dict, batch: int) -> str:
  ra, rb = images_per_s(a, batch), images_per_s(b, batch)
  return f"{ra / rb:.2f}" if ra and rb else "n/a"


def _run_fields(args) -> dict:
  return dict(batch=args.batch, iters=args.iters, warmup=args.warmup,
              max_run_seconds=args.max_run_seconds, num_classes=args.num_classes)


def main_table(args, cpus: list[int]) -> tuple[list[str], list[dict]]:
  rows, results = [], []
  header = ("| model | input | mode | JAX auto img/s | JAX native img/s | PyTorch img/s "
            "| JAX auto / PyTorch | JAX native / PyTorch |")
  rows += [header, "|" + "---|" * 8]
  for model in args.models:
    for spec in args.inputs:
      shape = parse_input(spec)
      for mode in ("inference", "training"):
        base = dict(model=model, mode=mode, cpus=cpus, **_run_fields(args), **shape)
        auto = measure(dict(base, framework="jax", impl="auto"), args.xla_flags)
        native = measure(dict(base, framework="jax", impl="native"), args.xla_flags)
        torch_result = measure(dict(base, framework="torch"), "")
        results.append(dict(base, auto=auto, native=native, torch=torch_result))
        row = (f"| {model} | {spec} | {mode} | {cell(auto, args.batch)} | "
               f"{cell(native, args.batch)} | {cell(torch_result, args.batch)} | "
               f"{ratio(auto, torch_result, args.batch)} | "
               f"{ratio(native, torch_result, args.batch)} |")
        print(row, flush=True)
        rows.append(row)
  return rows, results


def flags_table(args, cpus: list[int]) -> tuple[list[str], list[dict]]:
  model, spec = args.explore_model, args.explore_input
  rows = [f"| XLA_FLAGS ({model}, {spec}, JAX auto) | inference img/s | training img/s |",
          "|---|---|---|"]
  results = []
  for name in args.flag_sets:
    flags = XLA_FLAG_SETS[name]
    cells = []
    for mode in ("inference", "training"):
      cfg = dict(model=model, mode=mode, cpus=cpus, framework="jax", impl="auto",
                 **_run_fields(args), **parse_input(spec))
      results.append(dict(cfg, auto=measure(cfg, flags), torch={}))
      cells.append(cell(results[-1]["auto"], args.batch))
    row = f"| {name}: `{flags or '(none)'}` | {cells[0]} | {cells[1]} |"
    print(row, flush=True)
    rows.append(row)
  return rows, results


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                      default=["mobilenet_v2", "efficientformer_l1"],
                      help="registered names; each needs a twin in torch_twins.TWINS")
  parser.add_argument("--inputs", type=lambda s: s.split(","),
                      default=["48x48x1:small", "112x112x3"],
                      help="HxWxC[:stem]; a stem is passed to both frameworks")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--iters", type=int, default=10, help="timed calls per run")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls, compile included")
  parser.add_argument("--max_run_seconds", type=float, default=15.0,
                      help=f"stop timing a run after this long (at least {MIN_TIMED_CALLS} calls)")
  parser.add_argument("--num_classes", type=int, default=7)
  parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=None,
                      help="CPU ids to pin to (default: this process's affinity)")
  parser.add_argument("--xla_flags", default=os.environ.get("XLA_FLAGS", ""),
                      help="XLA_FLAGS of the main table")
  parser.add_argument("--explore_flags", action="store_true",
                      help="also time --explore_model under each set in XLA_FLAG_SETS")
  parser.add_argument("--flag_sets", type=lambda s: s.split(","), default=list(XLA_FLAG_SETS),
                      help=f"names from {sorted(XLA_FLAG_SETS)}")
  parser.add_argument("--explore_model", default="mobilenet_v2")
  parser.add_argument("--explore_input", default="112x112x3")
  parser.add_argument("--out", default=None, help="markdown file to write")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return parser


def _header(args, cpus, results, started) -> list[str]:
  loads = [r[side]["load"] for r in results for side in ("auto", "torch") if "load" in r[side]]
  loads = [started["load"], *loads]
  versions = {k: v for r in results for side in ("auto", "torch")
              for k, v in r[side].items() if k in ("jax", "torch", "torch_threads")}
  command = "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
  lines = [
      "# CPU speed: fer_jax (JAX) against PyTorch twins",
      "",
      f"* command: `{command}`",
      f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"* CPU: {cpu_model()}; pinned to CPUs {cpus} ({len(cpus)} threads for both frameworks;"
      f" torch.get_num_threads() = {versions.get('torch_threads')})",
      f"* versions: jax {versions.get('jax')}, torch {versions.get('torch')}, "
      f"Python {platform.python_version()}",
      f"* XLA_FLAGS (main table): `{args.xla_flags or '(none)'}`",
      f"* batch {args.batch}, {args.warmup} warm-up calls then {args.iters} timed calls "
      f"(fewer, shown as n, where they passed {args.max_run_seconds:.0f} s); "
      "images/s = batch / median call time; ± is half the (max - min) call-time range "
      "over the median",
      f"* load average (1 min), sampled before and after each run: {min(loads):.1f} to "
      f"{max(loads):.1f}; total runtime {time.time() - started['time']:.0f} s",
  ]
  if max(loads) > os.cpu_count():
    lines.append(
        f"* **Noisy**: the load average ({max(loads):.1f}) exceeded the machine's "
        f"{os.cpu_count()} CPUs, so other processes competed for the pinned cores. "
        "PyTorch's OpenMP threads lose more to that than XLA's thread pool, which "
        "biases the ratios toward JAX. README.md has a run on an idle machine.")
  return lines


def main():
  args = _parser().parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  cpus = args.cpus or sorted(os.sched_getaffinity(0))
  started = {"time": time.time(), "load": os.getloadavg()[0]}
  table, results = main_table(args, cpus) if args.models else ([], [])
  explore, explore_results = flags_table(args, cpus) if args.explore_flags else ([], [])
  lines = [*_header(args, cpus, results + explore_results, started), "", *table]
  if explore:
    lines += ["", "## XLA flag sets", "", *explore]
  emit(lines, args.out)


def emit(lines: list[str], out: str | None) -> None:
  """Prints a benchmark's markdown report and writes it to ``out`` if given."""
  text = "\n".join(lines) + "\n"
  print(text)
  if out:
    with open(out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
