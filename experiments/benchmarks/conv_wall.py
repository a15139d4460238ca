"""Where the CPU train step loses to PyTorch: one 3x3 convolution layer at a time.

For each 3x3 convolution shape of the CPU tier's VGG nets (configs/mkd.py: the
teacher at width 16, the student at width 8; batch 128, 48 px faces), time the
forward pass and the forward + backward pass (gradients for input and kernel),
in XLA:CPU (``jax.lax.conv_general_dilated``, NHWC, jitted; and
``fer_jax.models.layers.patch_grad_conv``, the same convolution with the CPU
form's kernel gradient) and in PyTorch fp32
eager (NCHW and channels_last), each in a fresh process pinned to the same
CPUs. Prints one JSON line per (shape, implementation) and, with ``--out``, a
markdown table.

  python experiments/benchmarks/conv_wall.py --out=experiments/benchmarks/conv_wall.md
"""
import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_speed  # noqa: E402

# (name, spatial size, input channels, output channels) of the CPU tier's 3x3 convs.
SHAPES = [(f"{net} stage{i + 1} conv{j + 1}", 48 >> i, cin, width << i)
          for net, width in (("teacher", 16), ("student", 8))
          for i in range(4) for j, cin in enumerate(
              ((1 if i == 0 else width << (i - 1)), width << i))]
IMPLS = ("jax", "jax_patch_grad", "torch_nchw", "torch_channels_last")


def _median_ms(fn, calls: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def run_jax(cfg: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  size, cin, cout, batch = cfg["size"], cfg["cin"], cfg["cout"], cfg["batch"]
  x = jnp.ones((batch, size, size, cin), jnp.float32)
  w = jnp.ones((3, 3, cin, cout), jnp.float32) * 0.01
  from fer_jax.models import layers  # pylint: disable=import-outside-toplevel
  padding = ((1, 1), (1, 1))
  conv = (functools.partial(layers.patch_grad_conv, padding=padding)
          if cfg["impl"] == "jax_patch_grad" else
          lambda x, w: jax.lax.conv_general_dilated(
              x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  forward = jax.jit(conv)
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  return {"forward_ms": _median_ms(lambda: forward(x, w).block_until_ready(), cfg["calls"]),
          "train_ms": _median_ms(lambda: jax.block_until_ready(both(x, w)), cfg["calls"])}


def run_torch(cfg: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(cfg["cpus"]))
  size, cin, cout, batch = cfg["size"], cfg["cin"], cfg["cout"], cfg["batch"]
  layout = (torch.channels_last if cfg["impl"] == "torch_channels_last"
            else torch.contiguous_format)
  conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(memory_format=layout)
  x = torch.ones(batch, cin, size, size).to(memory_format=layout).requires_grad_(True)

  def train():
    conv.zero_grad(set_to_none=True)
    x.grad = None
    (conv(x) ** 2).sum().backward()

  with torch.no_grad():
    forward_ms = _median_ms(lambda: conv(x), cfg["calls"])
  return {"forward_ms": forward_ms, "train_ms": _median_ms(train, cfg["calls"])}


def worker(cfg: dict) -> dict:
  os.sched_setaffinity(0, cfg["cpus"])
  return run_jax(cfg) if cfg["impl"].startswith("jax") else run_torch(cfg)


def rows_for(shape, args, cpus) -> list[dict]:
  name, size, cin, cout = shape
  base = dict(size=size, cin=cin, cout=cout, batch=args.batch, calls=args.calls, cpus=cpus)
  rows = []
  for impl in IMPLS:
    result = cpu_speed.measure(dict(base, impl=impl), "", __file__)
    rows.append({"layer": name, "shape": f"{size}x{size}x{cin}->{cout}", "impl": impl,
                 **{k: round(v, 3) for k, v in result.items()
                    if k in ("forward_ms", "train_ms", "load")},
                 **({"error": result["error"]} if "error" in result else {})})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def table(rows: list[dict]) -> list[str]:
  lines = ["| layer | shape | XLA fwd ms | XLA fwd+bwd ms: lax / patch kernel gradient | "
           "torch fwd+bwd ms (NCHW / channels_last) | XLA ÷ best torch, fwd+bwd: lax / patch |",
           "|---|---|---|---|---|---|"]
  for i in range(0, len(rows), len(IMPLS)):
    lax_row, patch, nchw, last = rows[i:i + len(IMPLS)]
    if any("error" in r for r in (lax_row, patch, nchw, last)):
      lines.append(f"| {lax_row['layer']} | {lax_row['shape']} | error | | | |")
      continue
    best = min(nchw["train_ms"], last["train_ms"])
    lines.append(f"| {lax_row['layer']} | {lax_row['shape']} | {lax_row['forward_ms']:.2f} | "
                 f"{lax_row['train_ms']:.2f} / {patch['train_ms']:.2f} | "
                 f"{nchw['train_ms']:.2f} / {last['train_ms']:.2f} | "
                 f"{lax_row['train_ms'] / best:.2f} / {patch['train_ms'] / best:.2f} |")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--out", default=None)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  cpus = sorted(os.sched_getaffinity(0))
  loads = [os.getloadavg()[0]]
  rows = [row for shape in SHAPES for row in rows_for(shape, args, cpus)]
  loads.append(os.getloadavg()[0])
  header = [
      "# One 3x3 convolution layer: XLA:CPU against PyTorch fp32",
      "",
      f"* command: `python {os.path.relpath(__file__)} {' '.join(sys.argv[1:])}`",
      f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; CPU: "
      f"{cpu_speed.cpu_model()}; each case a fresh process pinned to CPUs {cpus}",
      f"* batch {args.batch}, median of {args.calls} calls after 2 warm-up calls; "
      f"load average {loads[0]:.1f} before, {loads[-1]:.1f} after",
  ]
  cpu_speed.emit([*header, "", *table(rows)], args.out)


if __name__ == "__main__":
  main()
