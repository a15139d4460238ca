"""Parameter and multiply-accumulate (MAC) counts of registered models.

``count(name, (H, W, C))`` builds the registered model, traces its inference
forward pass (``train=False``) on a batch of one and returns

  * ``'params'``: the number of elements in the ``'params'`` collection
    (BatchNorm running statistics in ``'batch_stats'`` are not parameters);
  * ``'macs'``: the multiply-accumulates of every ``conv_general_dilated`` and
    ``dot_general`` in the forward jaxpr, sub-jaxprs included (a ``scan`` body
    counts ``length`` times, a ``cond`` counts its most expensive branch, a
    ``while`` body counts once because its trip count is not static). A
    convolution costs ``output elements x kernel window x input channels per
    group``, so depthwise layers cost ``k*k`` per output; a ``dot_general``
    costs ``output elements x contracted size``, which covers dense layers and
    attention matmuls alike. This is the convention of the published counts
    (He et al., torchvision, fvcore, timm cards): convolutions and matmuls only;
    normalisation, activations, pooling, additions and bias adds are free;
  * ``'xla_flops'``: XLA's own estimate, ``cost_analysis()['flops']`` of the
    lowered forward (the HLO before optimisation; the compiled module gives
    the same figure within 0.1 %). It does not follow the published
    convention: XLA counts a MAC as two flops, adds every elementwise and
    reduction op, and counts only the kernel taps that land inside the
    unpadded input, whereas published counts charge the full window at every
    output. At 224x224 the padding effect dominates: ResNet-18 has 1.814 G
    conv+FC MACs (published 1.8 G) but ``xla_flops / 2`` = 1.686 G; ResNet-50
    4.089 G (published 4.1 G) against 3.973 G. Hence ``'macs'`` comes from the
    jaxpr and ``'xla_flops'`` is only a cross-check.

Depthwise convolutions may run as shifted multiplies on CPU
(``fer_jax.models.layers.DepthwiseConv``), which would hide their MACs among
elementwise ops; counting therefore traces under
``layers.force_layer_forms('native')``, which makes them grouped
convolutions and every dense convolution a plain lax one.

Command line (the last printed line is a JSON object):

  python -m fer_jax.tools.count --model=resnet18 --input=224x224x3 \
      --num_classes=1000
"""
import json
import math
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from fer_jax import cli
from fer_jax import models
from fer_jax.models import layers


def count(name: str, input_shape: tuple[int, int, int],
          **model_kwargs) -> dict[str, int]:
  """Counts parameters and MACs of model ``name`` on one ``input_shape`` image.

  Args:
    name: a name registered in ``fer_jax.models.MODELS``.
    input_shape: ``(height, width, channels)`` of one input image.
    **model_kwargs: constructor fields; ``num_classes`` defaults to 1000.

  Returns:
    ``{'params': int, 'macs': int, 'xla_flops': int}`` as described in the
    module docstring.
  """
  if len(input_shape) != 3 or not all(
      isinstance(d, (int, np.integer)) and d > 0 for d in input_shape):
    raise ValueError(f"count: input_shape must be three positive ints "
                     f"(height, width, channels), got {input_shape!r}")
  num_classes = model_kwargs.pop("num_classes", 1000)
  model = models.build(name, num_classes=num_classes, **model_kwargs)
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

  def forward(variables, x):
    return model.apply(variables, x, train=False)

  with layers.force_layer_forms("native"):
    # eval_shape: only shapes are needed, so no weights are materialised.
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), image)
    closed_jaxpr = jax.make_jaxpr(forward)(variables, image)
    xla_cost = jax.jit(forward).lower(variables, image).cost_analysis()
  if isinstance(xla_cost, (list, tuple)):  # older jax: one dict per device
    xla_cost = xla_cost[0]
  result = {
      "params": sum(math.prod(leaf.shape)
                    for leaf in jax.tree.leaves(variables.get("params", {}))),
      "macs": jaxpr_macs(closed_jaxpr.jaxpr),
  }
  # Some backends (seen on GPU) give no cost analysis of a lowered module.
  if xla_cost and "flops" in xla_cost:
    result["xla_flops"] = int(xla_cost["flops"])
  return result


def cpu_images_per_second(name: str, input_shape: tuple[int, int, int], batch_size: int = 64,
                          iters: int = 10, **model_kwargs) -> float:
  """Inference throughput of model ``name`` on the host CPU, whatever the default backend.

  Eval mode, one jitted forward per batch of ``batch_size`` images, each call
  synchronised; batch size over the median call time, after one warm-up call.
  Weights are the initialiser's: speed does not depend on them. Depthwise
  layers take their CPU form (shifted slices) even when the default backend is
  an accelerator.
  """
  cpu = jax.devices("cpu")[0]
  model = models.build(name, **model_kwargs)
  with jax.default_device(cpu), layers.force_layer_forms("cpu"):
    images = jnp.zeros((batch_size, *input_shape), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    forward(variables, images).block_until_ready()
    times = []
    for _ in range(iters):
      start = time.perf_counter()
      forward(variables, images).block_until_ready()
      times.append(time.perf_counter() - start)
  return batch_size / statistics.median(times)


def jaxpr_macs(jaxpr: jax_core.Jaxpr) -> int:
  """Multiply-accumulates of the convolutions and matmuls in ``jaxpr``."""
  total = 0
  for eqn in jaxpr.eqns:
    primitive = eqn.primitive.name
    if primitive == "conv_general_dilated":
      total += _conv_macs(eqn)
    elif primitive == "dot_general":
      total += _dot_macs(eqn)
    elif primitive == "scan":
      total += eqn.params["length"] * jaxpr_macs(eqn.params["jaxpr"].jaxpr)
    elif primitive == "cond":
      total += max(jaxpr_macs(b.jaxpr) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_macs(_open(sub))
                   for sub in jax_core.jaxprs_in_params(eqn.params))
  return total


def _open(jaxpr: Any) -> jax_core.Jaxpr:
  return jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr


def _conv_macs(eqn: jax_core.JaxprEqn) -> int:
  kernel_shape = eqn.invars[1].aval.shape
  out_features_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  # The kernel's input-feature dim already holds channels per group, so this
  # is window size x input channels per group (batch groups split the output
  # features the same way).
  macs_per_output = math.prod(kernel_shape) // kernel_shape[out_features_dim]
  return math.prod(eqn.outvars[0].aval.shape) * macs_per_output


def _dot_macs(eqn: jax_core.JaxprEqn) -> int:
  (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  contracted = math.prod(lhs_shape[d] for d in lhs_contracting)
  return math.prod(eqn.outvars[0].aval.shape) * contracted


def parse_input_shape(text: str) -> tuple[int, int, int]:
  """Parses ``'HxWxC'`` (e.g. ``'224x224x3'``) into ``(H, W, C)``."""
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--input must look like HxWxC with positive integers, "
                     f"e.g. 224x224x3; got {text!r}")
  return tuple(int(p) for p in parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    input_shape = parse_input_shape(flags.FLAGS.input)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  result = count(flags.FLAGS.model, input_shape,
                 num_classes=flags.FLAGS.num_classes)
  print(f"{flags.FLAGS.model} @ {flags.FLAGS.input}: "
        f"{result['params'] / 1e6:.3f} M params, "
        f"{result['macs'] / 1e9:.3f} G MACs (conv + matmul), "
        f"XLA flops / 2 = {result.get('xla_flops', float('nan')) / 2e9:.3f} G")
  print(json.dumps({"params": result["params"], "macs": result["macs"]}))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing ``count`` from
  # other tools cannot clash with their own --model or --input flags.
  flags.DEFINE_string("model", None, "Registered model name.", required=True)
  flags.DEFINE_string("input", None, "Input size as HxWxC, e.g. 224x224x3.",
                      required=True)
  flags.DEFINE_integer("num_classes", 1000, "Classifier width.")
  cli.run(main)
