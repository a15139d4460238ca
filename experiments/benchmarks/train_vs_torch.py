r"""CPU training throughput: fer_jax's fused train steps against PyTorch twins.

Two cases, both the CPU tier (``tier=cpu``) of configs/mkd.py:

* ``teacher``: the phase of ``configs/mkd.py:data=fer2013,tier=cpu,teacher_only``,
  AFNet on a width-16 VGG backbone (``mkd.CPU_TEACHER``), trained on
  cross-entropy + the region regulariser;
* ``student``: phase ``student`` of ``configs/mkd.py:data=fer2013,tier=cpu``,
  vgg_fer width 8 (``mkd.CPU_STUDENT``) on cross-entropy + Hinton KD + MKD
  (1x1 adapters and the learned spatial attention over ``mkd.SAME_STAGES``),
  with the frozen teacher's forward pass in every step.

The configs are built as written, then ``config.data`` becomes the embedded
synthetic faces (48x48x1 grey, the FER2013 format; ``--train_size`` faces,
FER2013's 28709 by default, so the in-step shuffle costs the same).

* **fer_jax**: the trainer's own jitted step, timed by
  ``train_step.time_phase``: compile, one warm-up step, then ``--steps`` steps.
  The step also draws its batch from the device-resident set and augments it
  (affine, erasing, occlusion), work the twins do not do;
  **fer_jax_no_augment** is the same step with augmentation off;
  **fer_jax_lax_conv** is the step with every convolution a plain lax one
  (``layers.force_layer_forms('native')``: no patch kernel gradient), the step
  before the CPU forms of ``fer_jax.models.layers``.
* **torch_fp32** / **torch_bf16**: eager PyTorch with the twins of
  ``torch_twins.py`` (VGGFer, AFNet, MultiLayerKD; same layers, widths and
  parameter counts) doing the same loss terms and weights, SGD with Nesterov
  momentum 0.9, weight decay on kernels only, gradient clipping
  (``mkd.CPU_OPTIMIZER``). A step draws a shuffled batch from resident uint8
  images and normalises it. ``torch_bf16`` runs forward and losses under
  ``torch.autocast('cpu', torch.bfloat16)``, channels_last. The teacher runs
  under ``no_grad`` in eval mode, as fer_jax's frozen teacher.

Each (case, implementation) runs alone in a fresh process, one after the
other, pinned to the same CPUs as cpu_speed.py does it (XLA sizes its thread
pool from the affinity mask; torch gets that many threads and one inter-op
thread). Untimed warm-up steps come first (JAX: the compile and one step);
images/s is the batch over the median step time. Each row also gives the
parameter counts (model, loss-term modules, teacher) of both frameworks.

Usage (the full run; on an idle machine, not while other jobs use the cores):

  python experiments/benchmarks/train_vs_torch.py \
      --out=experiments/benchmarks/train_vs_torch.md
  python experiments/benchmarks/train_vs_torch.py --smoke   # batch 16, 2 steps

One JSON line per (case, implementation) goes to stdout; ``--out`` writes the
markdown table with the command, machine and load averages.

On cores that other processes also use, PyTorch's OpenMP threads spin-wait for
each other and a step can take 10-40x longer (seen: batch 16 AFNet, 4.3 s
against 0.1 s with ``OMP_WAIT_POLICY=PASSIVE``); XLA's pool is not hit that
way. Measure on idle cores; the table flags a load average above the CPU count.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import cpu_speed  # noqa: E402  (stdlib only at import; jax and torch load in workers)

from experiments import hardware  # noqa: E402
from experiments.hardware import cpu_model  # noqa: E402

# case -> (configs/mkd.py argument string, timed phase)
CASES = {
    "teacher": ("data=fer2013,tier=cpu,teacher_only", "teacher"),
    "student": ("data=fer2013,tier=cpu", "student"),
}
IMPLS = ("fer_jax", "fer_jax_no_augment", "fer_jax_lax_conv", "torch_fp32", "torch_bf16")
# The config's augmentation switched off: the same work as the twins' steps, and
# the share of fer_jax's step that augmentation takes.
NO_AUGMENT = dict(flip=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_deg=0.0,
                  erase_prob=0.0, occlusion_prob=0.0)
FER2013_TRAIN_SIZE = 28709
IMAGE_SHAPE = (48, 48, 1)  # FER2013's and the synthetic faces'
SMOKE = {"batch": 16, "steps": 2, "warmup": 1, "train_size": 256}


# --- the phases, from the config --------------------------------------------------


def case_config(case: str, batch: int, train_size: int):
  """(config, timed phase name): the mkd.py CPU-tier config on the synthetic faces."""
  from configs import mkd  # pylint: disable=import-outside-toplevel
  from fer_jax import config_utils as cu  # pylint: disable=import-outside-toplevel
  arg, phase = CASES[case]
  config = mkd.get_config(arg)
  data = cu.data_config("synthetic")
  data.split_sizes = {"train": train_size, "validation": 16, "test": 16}
  config.data = data
  for name in config.phases:  # the teacher of 'student' too: it must fit the split
    config[name].batch_size = batch
  return config, phase


def _count(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def jax_param_counts(config, phase: str) -> dict:
  """Parameters of the phase's model, its loss terms and its teacher (fresh init)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from fer_jax import phase as phase_lib  # pylint: disable=import-outside-toplevel
  from fer_jax import train  # pylint: disable=import-outside-toplevel
  from fer_jax.data import classes  # pylint: disable=import-outside-toplevel
  one = {"image": np.zeros((1, *IMAGE_SHAPE), np.uint8), "label": np.zeros(1, np.int32),
         "index": np.zeros(1, np.int64)}
  data = dataclasses.replace(phase_lib.DataInfo.of(classes.FER7, one),
                             train_size=config.data.split_sizes.train)
  built = train.untrained_phases(config, data, train.make_mesh(), until=phase)[phase]
  return {"params": _count(built.state["params"]["model"]),
          "objective_params": _count(built.state["params"]["objective"]),
          "teacher_params": _count(built.teacher_variables.get("params", {}))}


def run_fer_jax(cfg: dict) -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import train_step  # pylint: disable=import-outside-toplevel
  config, phase = case_config(cfg["case"], cfg["batch"], cfg["train_size"])
  from fer_jax.models import layers  # pylint: disable=import-outside-toplevel
  if cfg["impl"] == "fer_jax_no_augment":
    config.augment.update(NO_AUGMENT)
  forms = (layers.force_layer_forms("native") if cfg["impl"] == "fer_jax_lax_conv"
           else contextlib.nullcontext())
  with forms:
    timing = train_step.time_phase(config, phase, cfg["steps"])
  return {"step_s": timing["step_s"], "spread_s": timing["spread_s"],
          "compile_s": timing["compile_s"], **jax_param_counts(config, phase),
          "jax": jax.__version__, "flax": flax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


# --- the PyTorch twins ------------------------------------------------------------


def build_twin(phase_cfg, num_classes: int):
  """The torch twin of a phase's model (NCHW, ``IMAGE_SHAPE``)."""
  import torch_twins  # pylint: disable=import-outside-toplevel
  kwargs = phase_cfg.model_kwargs.to_dict()
  return torch_twins.TWINS[phase_cfg.model](num_classes, IMAGE_SHAPE[2],
                                            input_size=IMAGE_SHAPE[0], **kwargs)


def aux_channels(model) -> dict:
  """Channels of each 4-D aux map of a twin (one eval forward on two blank images)."""
  import torch  # pylint: disable=import-outside-toplevel
  was_training = model.training
  model.eval()
  with torch.no_grad():
    _, aux = model.forward_aux(torch.zeros(2, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2]))
  model.train(was_training)
  return {k: v.shape[1] for k, v in aux.items() if v.ndim == 4}


def torch_term(name: str, cfg: dict, student, teacher, num_classes: int):
  """(module with parameters or None, loss(student_out, teacher_out, labels)) of a term."""
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  import torch_twins  # pylint: disable=import-outside-toplevel
  kind = cfg.get("kind", name)
  if kind == "ce" and not cfg.get("soft", False):
    smoothing = cfg.get("label_smoothing", 0.0)
    return None, lambda s, t, y: F.cross_entropy(s[0].float(), y, label_smoothing=smoothing)
  if kind == "hinton_kd":
    return None, lambda s, t, y: torch_twins.hinton_kd(s[0], t[0], cfg.get("temperature", 4.0))
  if kind == "aux_loss":
    return None, lambda s, t, y: s[1][cfg.get("key", "region_loss")]
  if kind == "mkd":
    module = torch_twins.MultiLayerKD(cfg["pairs"], aux_channels(student), aux_channels(teacher),
                                      num_classes, cfg.get("attention", "learned"),
                                      cfg.get("standardize", False))
    return module, lambda s, t, y: module(s[1], t[1], y)
  raise ValueError(f"term {name} ({kind}) has no PyTorch twin")


def torch_objective(terms: dict, student, teacher, num_classes: int):
  """(ModuleDict of the terms' parameters, loss function): the weighted sum of the terms."""
  from torch import nn  # pylint: disable=import-outside-toplevel
  modules, parts = nn.ModuleDict(), []
  for name, cfg in terms.items():
    module, fn = torch_term(name, cfg, student, teacher, num_classes)
    if module is not None:
      modules[name] = module  # Flax's path: params/objective/<term name>/...
    parts.append((cfg.get("weight", 1.0), fn))
  return modules, lambda s, t, y: sum(w * fn(s, t, y) for w, fn in parts)


def torch_optimizer(params: list, opt: dict):
  """SGD as fer_jax's: Nesterov momentum, weight decay on kernels (ndim > 1) only."""
  import torch  # pylint: disable=import-outside-toplevel
  if opt["name"] != "sgd":
    raise ValueError(f"optimizer {opt['name']} has no PyTorch twin here")
  groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": opt["weight_decay"]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
  return torch.optim.SGD(groups, lr=opt["lr"], momentum=opt["momentum"], nesterov=True)


def torch_phase(cfg: dict):
  """(student, teacher or None, objective modules, loss function, phase config)."""
  config, phase = case_config(cfg["case"], cfg["batch"], cfg["train_size"])
  phase_cfg, num_classes = config[phase], 7  # FER2013's and the synthetic faces' classes
  student = build_twin(phase_cfg, num_classes)
  teacher = None
  if phase_cfg.teacher:
    teacher = build_twin(config[phase_cfg.teacher], num_classes).eval().requires_grad_(False)
  modules, loss_fn = torch_objective(phase_cfg.terms.to_dict(), student, teacher, num_classes)
  return student, teacher, modules, loss_fn, phase_cfg


def torch_step(cfg: dict, student, teacher, params, loss_fn, optimizer, clip_norm: float):
  """One training step as a closure: sample, forward (+ frozen teacher), loss, update."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  bf16 = cfg["impl"] == "torch_bf16"
  rng = np.random.default_rng(0)
  n, (height, width, channels) = cfg["train_size"], IMAGE_SHAPE
  images = torch.from_numpy(rng.integers(0, 256, (n, channels, height, width), np.uint8))
  labels = torch.from_numpy(rng.integers(0, 7, n))
  layout = torch.channels_last if bf16 else torch.contiguous_format

  def step():
    idx = torch.randperm(n)[:cfg["batch"]]
    x = (images[idx].float() / 255.0 - 0.5) / 0.5  # fer_jax's normalisation
    x, y = x.contiguous(memory_format=layout), labels[idx]
    cast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    with cast:
      with torch.no_grad():
        t_out = teacher.forward_aux(x) if teacher is not None else None
      loss = loss_fn(student.forward_aux(x), t_out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm:
      torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss

  return step


def run_torch(cfg: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(cfg["cpus"]))
  torch.set_num_interop_threads(1)
  torch.manual_seed(0)
  student, teacher, modules, loss_fn, phase_cfg = torch_phase(cfg)
  layout = torch.channels_last if cfg["impl"] == "torch_bf16" else torch.contiguous_format
  for model in (student, teacher, modules):
    if model is not None:
      model.to(memory_format=layout)
  params = list(student.parameters()) + list(modules.parameters())
  optimizer = torch_optimizer(params, phase_cfg.optimizer.to_dict())
  step = torch_step(cfg, student.train(), teacher, params, loss_fn, optimizer,
                    phase_cfg.optimizer.clip_norm)
  timing = dict(cfg, iters=cfg["steps"], max_run_seconds=math.inf)
  first, times = cpu_speed._timed(step, timing)  # pylint: disable=protected-access
  count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0
  return {"step_s": statistics.median(times), "spread_s": (max(times) - min(times)) / 2,
          "first_call_s": first, "params": count(student), "objective_params": count(modules),
          "teacher_params": count(teacher), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


def worker(cfg: dict) -> dict:
  os.sched_setaffinity(0, cfg["cpus"])  # before jax loads: XLA sizes its pool from it
  return run_fer_jax(cfg) if cfg["impl"].startswith("fer_jax") else run_torch(cfg)


# --- driver -----------------------------------------------------------------------


def case_rows(case: str, results: dict, batch: int) -> list[dict]:
  """The JSON rows of one case; fer_jax's carries its speed-up over each torch mode."""
  rows = []
  for impl, r in results.items():
    row = {"case": case, "impl": impl, "batch": batch}
    if "error" in r:
      rows.append({**row, "error": r["error"]})
      continue
    row.update(img_per_s=round(batch / r["step_s"], 1), step_ms=round(1e3 * r["step_s"], 2),
               spread_ms=round(1e3 * r["spread_s"], 2),
               **{k: r[k] for k in ("params", "objective_params", "teacher_params")})
    row.update({k: round(r[k], 2) for k in ("compile_s", "first_call_s") if k in r})
    rows.append(row)
  timed = [r for r in rows if "img_per_s" in r]
  for jax_row in (r for r in timed if r["impl"].startswith("fer_jax")):
    for other in (r for r in timed if r["impl"].startswith("torch")):
      jax_row[f"vs_{other['impl']}"] = round(jax_row["img_per_s"] / other["img_per_s"], 2)
  return rows


def table(rows: list[dict]) -> list[str]:
  lines = [("| case | implementation | params: model / loss terms / teacher "
            "| step ms (median ± half range) | img/s | fer_jax ÷ this "
            "(without augmentation) |"),
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['case']} | {r['impl']} | | error: {r['error']} | | |")
      continue
    ratios = [j.get(f"vs_{r['impl']}") for impl in ("fer_jax", "fer_jax_no_augment")
              for j in rows if j["case"] == r["case"] and j["impl"] == impl]
    ratio = (f"{ratios[0]}" + (f" ({ratios[1]})" if len(ratios) > 1 and ratios[1] else "")
             if ratios and ratios[0] else "")
    params = f"{r['params']:,} / {r['objective_params']:,} / {r['teacher_params']:,}"
    lines.append(f"| {r['case']} | {r['impl']} | {params} | {r['step_ms']:.1f} ± "
                 f"{r['spread_ms']:.1f} | {r['img_per_s']:.0f} | {ratio} |")
  return lines


def header(args, cpus: list[int], loads: list[float], results: list[dict],
           stolen: float | None) -> list[str]:
  versions = {k: v for r in results for k, v in r.items()
              if k in ("jax", "flax", "torch", "torch_threads")}
  command = "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
  lines = [
      "# Training throughput: fer_jax fused steps against PyTorch twins (CPU)", "",
      f"* command: `{command}`",
      f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      (f"* CPU: {cpu_model()}; pinned to CPUs {cpus} ({len(cpus)} threads for both "
       f"frameworks; torch.get_num_threads() = {versions.get('torch_threads')})"),
      (f"* versions: jax {versions.get('jax')}, flax {versions.get('flax')}, torch "
       f"{versions.get('torch')}, Python {platform.python_version()}; "
       f"XLA_FLAGS `{args.xla_flags or '(none)'}`, "
       f"OMP_WAIT_POLICY `{os.environ.get('OMP_WAIT_POLICY', '(unset)')}`"),
      (f"* batch {args.batch}; {args.steps} timed steps after the warm-up (fer_jax: the "
       f"compile and 1 step; PyTorch: {args.warmup} step(s)); {args.train_size} resident "
       "48x48x1 images (fer_jax: the synthetic faces; PyTorch: random uint8)"),
      ("* `fer_jax` is the config's step, which also augments its batch on the device "
       "(flip, affine, erasing, occlusion); `fer_jax_no_augment` is the same step with "
       "augmentation off, the twins' work (they only sample and normalise); "
       "`fer_jax_lax_conv` is `fer_jax` with plain lax convolutions (no patch kernel gradient)"),
      (f"* load average (1 min): {loads[0]:.1f} before, {loads[-1]:.1f} after "
       f"(range over the runs {min(loads):.1f} to {max(loads):.1f}); CPU time stolen by "
       f"the hypervisor during the runs: "
       + (f"{100 * stolen:.0f} %" if stolen is not None else "unknown")),
  ]
  if max(loads) > os.cpu_count():
    lines.append(f"* **Noisy**: the load average passed the machine's {os.cpu_count()} CPUs; "
                 "other processes competed for the pinned cores.")
  return lines


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  split = lambda s: [c for c in s.split(",") if c]
  parser.add_argument("--cases", type=split, default=list(CASES), help=f"of {list(CASES)}")
  parser.add_argument("--impls", type=split, default=list(IMPLS), help=f"of {list(IMPLS)}")
  parser.add_argument("--batch", type=int, default=128, help="the configs' batch size")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
  parser.add_argument("--warmup", type=int, default=2, help="untimed PyTorch steps")
  parser.add_argument("--train_size", type=int, default=FER2013_TRAIN_SIZE,
                      help="resident training images (FER2013's train split by default)")
  parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=None,
                      help="CPU ids to pin to (default: this process's affinity)")
  parser.add_argument("--xla_flags", default=os.environ.get("XLA_FLAGS", ""))
  parser.add_argument("--smoke", action="store_true",
                      help=f"a quick check that everything runs: {SMOKE}")
  parser.add_argument("--out", default=None, help="markdown file to write")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  unknown = sorted(set(args.cases) - set(CASES)) + sorted(set(args.impls) - set(IMPLS))
  if unknown:
    parser.error(f"unknown cases or implementations: {unknown}")
  if args.smoke:
    vars(args).update(SMOKE)
  return args


def main():
  args = parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  cpus = args.cpus or sorted(os.sched_getaffinity(0))
  loads, rows, results = [os.getloadavg()[0]], [], []
  times_before = hardware.cpu_times()
  for case in args.cases:
    base = {"case": case, "cpus": cpus, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "train_size": args.train_size}
    by_impl = {impl: cpu_speed.measure(dict(base, impl=impl), args.xla_flags, __file__)
               for impl in args.impls}
    loads += [r["load"] for r in by_impl.values()]
    results += by_impl.values()
    for row in case_rows(case, by_impl, args.batch):
      print(json.dumps(row), flush=True)
      rows.append(row)
  loads.append(os.getloadavg()[0])
  stolen = hardware.stolen_share(times_before, hardware.cpu_times())
  cpu_speed.emit([*header(args, cpus, loads, results, stolen), "", *table(rows)], args.out)


if __name__ == "__main__":
  main()
