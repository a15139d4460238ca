r"""Where the CPU tier's fused train steps spend their time, per XLA op.

For each case of train_vs_torch.py (``teacher``: AFNet on the width-16 VGG;
``student``: the width-8 VGG with Hinton KD + MKD and the frozen teacher's
forward) and each layer form of ``fer_jax.models.layers`` (``cpu``: the patch
kernel gradient and the reshape max-pool; ``native``: plain lax ops), this
compiles the trainer's own step (``train_step.compiled_phase``), runs
``--steps`` steps under ``jax.profiler.trace`` and reads the Perfetto trace it
writes. XLA:CPU records one event per executed op (thunk), named as the
instruction in the compiled module, so each event is matched to its HLO
instruction, and through the instruction's metadata to the JAX primitive and
the Flax module that produced it. Ops inside loops (the patch gradient's scan
over batch chunks) count in their loop bodies; the loops themselves are not
counted again.

Groups:
* **pass**: ``backward`` for ops JAX made by transposing the forward pass (their
  op_name holds ``transpose(``), ``forward`` otherwise, which includes the
  optimizer update and the augmentation;
* **op**: the HLO opcode; for a fusion, the costly opcodes it fuses
  (``fused convolution + reduce``), else ``fused elementwise`` or ``fused layout
  change``;
* **Flax module**: the module path in the op's op_name metadata (for a fusion,
  its root's, else the first fused op's). Ops XLA made itself, such as some
  layout copies and the kernel-gradient convolutions it rewrites, carry no
  op_name and are counted as ``(no op_name)``.

Usage (on idle cores; about seven minutes on 2 cores):

  python experiments/benchmarks/op_profile.py --out=experiments/benchmarks/op_profile.md
  python experiments/benchmarks/op_profile.py --smoke   # batch 16, 2 steps

The op times are the events' durations summed over the profiled steps and
divided by their number. XLA:CPU may run independent ops at the same time, so
the ops' sum can exceed the step's wall time; the table gives both.
"""
import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import jax  # noqa: E402

import train_step  # noqa: E402
import train_vs_torch  # noqa: E402
from experiments import hardware  # noqa: E402
from fer_jax.models import layers  # noqa: E402

FORMS = ("cpu", "native")
# Control flow: the ops of their bodies have events of their own.
CONTAINERS = {"while", "conditional", "call"}
# The opcodes that name a fusion; the rest are elementwise or layout changes.
COSTLY = ("convolution", "dot", "reduce-window", "select-and-scatter", "reduce", "gather",
          "scatter", "sort", "dynamic-slice", "dynamic-update-slice")
SCAN_BODY = {"while", "body", "closed_call"}  # op_name parts of a loop body's ops
LAYOUT = {"parameter", "transpose", "copy", "bitcast", "reshape", "broadcast", "constant"}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<shape>.+?)\s(?P<opcode>[a-z][a-z0-9_-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_CALLS = re.compile(r"calls=%(?P<called>[^\s,}]+)")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> opcode, shape, op_name, called computation, computation, root."""
  instructions, computation = {}, ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header["name"]
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    op_name, called = _OP_NAME.search(line), _CALLS.search(line)
    instructions[match["name"]] = {
        "opcode": match["opcode"], "shape": match["shape"].split("{")[0],
        "op_name": op_name["op_name"] if op_name else "",
        "called": called["called"] if called else "", "computation": computation,
        "root": line.lstrip().startswith("ROOT ")}
  return instructions


def source_op_name(name: str, instructions: dict) -> str:
  """The op_name of an instruction, or for a fusion its root's (else any fused op's)."""
  inst = instructions[name]
  if inst["op_name"] or not inst["called"]:
    return inst["op_name"]
  inner = [i for i in instructions.values() if i["computation"] == inst["called"]]
  named = sorted((not i["root"], i["op_name"]) for i in inner if i["op_name"])
  return named[0][1] if named else ""


def op_kind(name: str, instructions: dict) -> str:
  """An instruction's HLO opcode; for a fusion, the costly opcodes it fuses."""
  inst = instructions[name]
  if inst["opcode"] != "fusion":
    return inst["opcode"]
  inner = [i["opcode"] for i in instructions.values() if i["computation"] == inst["called"]]
  costly = list(dict.fromkeys(op for op in inner if op in COSTLY))
  if costly:
    return "fused " + " + ".join(costly)
  return "fused " + ("layout change" if set(inner) <= LAYOUT else "elementwise")


def group_of(name: str, instructions: dict) -> tuple[str, str, str]:
  """(pass, HLO op kind, Flax module path) of an executed instruction."""
  op_name = source_op_name(name, instructions)
  kind = op_kind(name, instructions)
  if not op_name:
    return "(no op_name)", kind, ""
  parts = [re.sub(r"^(?:\w+\()+|\)+$", "", p) for p in op_name.split("/") if p]
  module = "/".join(p for p in parts[1:-1] if p not in SCAN_BODY)
  return ("backward" if "transpose(" in op_name else "forward"), kind, module


def trace_op_ms(trace_dir: str, instructions: dict, num_steps: int) -> dict[str, float]:
  """Milliseconds per step of each executed instruction, from the Perfetto trace."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if len(paths) != 1:
    raise RuntimeError(f"expected one Perfetto trace under {trace_dir}, found {paths}")
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total = collections.Counter()
  for event in events:
    name = event.get("name")
    if event.get("ph") == "X" and name in instructions and (
        instructions[name]["opcode"] not in CONTAINERS):
      total[name] += event["dur"] / 1e3  # the trace's durations are microseconds
  return {name: ms / num_steps for name, ms in total.items()}


def profile_ops(compiled, run, num_steps: int) -> dict:
  """Per-op milliseconds of ``num_steps`` calls of ``run()``, which executes ``compiled``.

  Returns the seconds of each call ('times'), each executed instruction's
  milliseconds per call ('op_ms'), its (pass, op, module) group and its shape.
  """
  instructions = hlo_instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      times = [run() for _ in range(num_steps)]
    op_ms = trace_op_ms(trace_dir, instructions, num_steps)
  return {"times": times, "op_ms": op_ms,
          "groups": {n: group_of(n, instructions) for n in op_ms},
          "shapes": {n: instructions[n]["shape"] for n in op_ms}}


def profile(case: str, form: str, args) -> dict:
  """Step wall time and per-op milliseconds of one case in one layer form."""
  config, phase = train_vs_torch.case_config(case, args.batch, args.train_size)
  with layers.force_layer_forms(form):
    step_fn, state, inputs, _, batch = train_step.compiled_phase(config, phase)
  state, _ = train_step.run_steps(step_fn, state, inputs, args.warmup)

  def run():
    nonlocal state
    state, (seconds,) = train_step.run_steps(step_fn, state, inputs, 1)
    return seconds

  ops = profile_ops(step_fn, run, args.steps)
  return {"case": case, "form": form, "batch": batch,
          "step_ms": 1e3 * statistics.median(ops.pop("times")), **ops}


def grouped(result: dict, key) -> list[tuple[tuple, float]]:
  """(group, ms per step), largest first, grouping the ops by ``key(pass, op, module)``."""
  total = collections.Counter()
  for name, ms in result["op_ms"].items():
    total[key(*result["groups"][name])] += ms
  return total.most_common()


def layer_type(module: str) -> str:
  """The last part of a Flax module path without its index: 'conv', 'bn', 'Conv', 'mkd'."""
  return re.sub(r"_\d+$", "", module.rsplit("/", 1)[-1]) if module else "-"


def side_by_side(results: list[dict], key, columns: list[str], top: int) -> list[str]:
  """Groups of ops (``key(pass, op, module)``), ms per step in each form, largest first."""
  per_form = {r["form"]: dict(grouped(r, key)) for r in results}
  order = sorted({g for groups in per_form.values() for g in groups},
                 key=lambda g: -max(groups.get(g, 0.0) for groups in per_form.values()))
  forms, blank = [r["form"] for r in results], "| " * (len(columns) - 1)
  lines = ["| " + " | ".join(columns) + " | "
           + " | ".join(f"ms/step, {f} form" for f in forms) + " |",
           "|" + "---|" * (len(columns) + len(forms))]
  for g in order[:top]:
    lines.append("| " + " | ".join(g) + " | "
                 + " | ".join(f"{per_form[f].get(g, 0.0):.1f}" for f in forms) + " |")
  rest = order[top:]
  lines.append(f"| other ({len(rest)} groups) {blank}| " + " | ".join(
      f"{sum(per_form[f].get(g, 0.0) for g in rest):.1f}" for f in forms) + " |")
  lines.append(f"| **all ops** {blank}| " + " | ".join(
      f"**{sum(r['op_ms'].values()):.1f}**" for r in results) + " |")
  lines.append(f"| **step wall time** (median) {blank}| " + " | ".join(
      f"**{r['step_ms']:.1f}**" for r in results) + " |")
  return lines


def top_ops_table(result: dict, top: int) -> list[str]:
  """The ``top`` slowest instructions of one profile, with their source."""
  lines = ["| instruction | pass | HLO op | Flax module | output shape | ms/step | share of ops |",
           "|---|---|---|---|---|---|---|"]
  total = sum(result["op_ms"].values())
  for name, ms in sorted(result["op_ms"].items(), key=lambda kv: -kv[1])[:top]:
    pass_, op, module = result["groups"][name]
    lines.append(f"| `{name}` | {pass_} | {op} | {module or '-'} | {result['shapes'][name]} | "
                 f"{ms:.1f} | {100 * ms / total:.1f} % |")
  return lines


def report(args, results: list[dict], stolen: float | None) -> list[str]:
  command = "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
  lines = ["# Per-op profile of the CPU tier's fused train steps (XLA:CPU)", "",
           f"* command: `{command}`",
           f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
           f"* machine: {hardware.describe()}; jax {jax.__version__}; XLA_FLAGS "
           f"`{os.environ.get('XLA_FLAGS', '') or '(none)'}`; load average "
           f"{os.getloadavg()[0]:.1f} at the end; CPU time stolen by the hypervisor during "
           "the profiles: " + (f"{100 * stolen:.0f} %" if stolen is not None else "unknown"),
           f"* batch {args.batch}; {args.steps} profiled steps after {args.warmup} warm-up "
           "step(s); ms/step is an op's event time summed over the profiled steps / steps",
           "* forms: `cpu` is what `auto` picks on the CPU backend (patch kernel gradient, "
           "reshape max-pool); `native` is plain lax convolutions and pooling"]
  for case in args.cases:
    case_results = [r for r in results if r["case"] == case]
    lines += ["", f"## {case}: time by pass and HLO op", "",
              *side_by_side(case_results, lambda p, op, module: (p, op), ["pass", "HLO op"],
                            args.top),
              "", f"## {case}: time by pass and layer type (the module path's last part)",
              "", *side_by_side(case_results, lambda p, op, module: (p, layer_type(module)),
                                ["pass", "layer type"], args.top)]
    for r in case_results:
      lines += ["", f"### {case}, {r['form']} form: the {args.top} slowest ops", "",
                *top_ops_table(r, args.top)]
  return lines


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  split = lambda s: [c for c in s.split(",") if c]
  parser.add_argument("--cases", type=split, default=list(train_vs_torch.CASES))
  parser.add_argument("--forms", type=split, default=list(FORMS))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5, help="profiled steps")
  parser.add_argument("--warmup", type=int, default=1, help="steps before profiling")
  parser.add_argument("--train_size", type=int, default=train_vs_torch.FER2013_TRAIN_SIZE)
  parser.add_argument("--top", type=int, default=12, help="rows of each table")
  parser.add_argument("--smoke", action="store_true", help="batch 16, 2 steps, 512 faces")
  parser.add_argument("--out", default=None, help="markdown file to write")
  args = parser.parse_args()
  unknown = (sorted(set(args.cases) - set(train_vs_torch.CASES))
             + sorted(set(args.forms) - set(FORMS)))
  if unknown:
    parser.error(f"unknown cases or forms: {unknown}")
  if args.smoke:
    args.batch, args.steps, args.train_size = 16, 2, 512
  return args


def main():
  args = parse_args()
  results, times_before = [], hardware.cpu_times()
  for case in args.cases:
    for form in args.forms:
      results.append(profile(case, form, args))
      print(json.dumps({k: results[-1][k] for k in ("case", "form", "batch", "step_ms")}
                       | {"ops_ms": round(sum(results[-1]["op_ms"].values()), 1)}), flush=True)
  stolen = hardware.stolen_share(times_before, hardware.cpu_times())
  text = "\n".join(report(args, results, stolen)) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
