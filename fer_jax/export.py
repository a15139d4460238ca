"""Exports a trained model, preprocessing included, to ONNX or TFLite (optionally int8).

  python -m fer_jax.export --model=NAME_OR_DIR --format=onnx --out=FILE [--int8]
      [--calibration=PATH_TO_fer2013.npz] [--calibration_count=N] [--no_verify]
  python -m fer_jax.export --model=NAME_OR_DIR --format=tflite --out=FILE [--int8]
      --onnx2tf=VENV312/bin/onnx2tf

``--model`` is a model directory (``fer_jax.model_dir``) or the name of a
shipped one under ``fer_jax/pretrained/<name>/``. ``--input_dtype=float32`` takes
the same pixels (0-255) as float32: for converters that calibrate with float
data, such as onnx2tf's int8 TFLite (docs/export.md).

``--format=tflite`` converts the ONNX graph with onnx2tf's TensorFlow-free
``flatbuffer_direct`` backend. onnx2tf needs Python 3.12 and pins packages that
clash with this environment, so ``--onnx2tf`` names the executable of its own
venv. fp32 keeps the uint8 input; ``--int8`` converts the float-input graph
(onnx2tf's calibrator feeds float32), calibrated on the same FER2013 Training
faces, and writes onnx2tf's ``integer_quant`` model: float32 pixels in,
probabilities out, int8 inside.

The ONNX graph is the whole of ``TrainedModel.forward`` plus a softmax:

  input   ``images``         uint8 ``[N, *image_shape]`` (N is dynamic; float32 with
                             ``--input_dtype=float32``)
  output  ``probabilities``  float32 ``[N, K]``, in ``class_names`` order
          ``va``             float32 ``[N, num_va]`` (only when ``num_va > 0``)

so a phone or laptop feeds raw face crops and needs nothing but an ONNX runtime.
The class names, the image shape and the preprocessing are written into the
model's metadata (``metadata_props``: ``class_names`` as JSON, ...). The
variables are constants of the graph (initializers).

How the graph is built. jax2onnx (the ``export`` extra) converts a JAX
function by tracing it with its own plugins active; for Flax Linen it swaps
``nn.Conv.__call__``, ``nn.max_pool`` and friends for its own versions while it
traces. With jax2onnx 0.13.0-0.17.1 and flax 0.12.8 those swaps break this zoo:
``nn.max_pool(x, (2, 2), ...)`` and ``nn.avg_pool`` with a positional window
raise a TypeError, and ResNet-18's residual additions come out with mismatched
layouts (onnxruntime rejects the graph). So the forward pass is first traced by
plain JAX to a jaxpr (the depthwise convolutions forced to their grouped
``'native'`` form, which ONNX has as ``Conv`` with ``group``), and jax2onnx then
converts a function that re-evaluates that jaxpr primitive by primitive:
jax2onnx only sees ``lax`` primitives, whose converters are the best tested
ones. While re-evaluating, the interpreter

  * inlines nested ``jit`` and ``custom_jvp``/``custom_vjp`` calls;
  * computes every equation whose inputs are all constants (e.g. BatchNorm's
    ``scale * rsqrt(var + eps)``) right away, so the graph holds one folded
    constant instead of the arithmetic;
  * folds the per-channel ``sub``/``mul``/``add`` of an inference BatchNorm (and
    a conv bias) into the preceding convolution's kernel and bias
    (``_AffineConv``): jax2onnx's NHWC convolutions are wrapped in Transposes
    and onnxruntime does not fuse the affine ops across them (with the Clip
    fusion below: 450 -> 3,700 img/s at batch 256 for MobileNetV2-0.5 on 2
    shared cores);
  * rewrites ``reduce_window_max`` (max-pooling): jax2onnx lowers the
    primitive to a MaxPool over all four NHWC axes, which onnxruntime rejects
    ("Unsupported pooling size"), so a 2-D window goes through Linen's
    ``pool``, which jax2onnx converts to a 2-D MaxPool, and any other window
    becomes the maximum of strided slices. One MaxPool per pool instead of
    slices (with the Softmax below) took the shipped student from 0.44 to
    0.36 ms at batch 1 on one core, int8 from 0.51 to 0.28 ms (91 fewer
    nodes, and onnxruntime's blocked convolution layout no longer undone at
    every pooling; experiments/benchmarks/onnx_ab.py);
  * rewrites jax's ``stack`` primitive (new in jax 0.9) as expand-dims and
    concatenate, which jax2onnx 0.13 converts.

The softmax is applied outside the jaxpr, as jax2onnx's one ``Softmax`` node.
The ONNX graph is then tidied: ``Max(x, 0) -> Min(., 6)`` becomes ``Clip``
and a lone ``Max(x, 0)`` ``Relu`` (both fuse into convolutions in onnxruntime
and its quantiser; Max/Min do not), a Dense layer's ``Gemm(x, W[, 0]) -> Add(b)``
becomes ``Gemm(x, W, b)`` (onnxruntime's quantiser fails on the scalar zero),
and the intermediate shape annotations are dropped (jax2onnx's are sometimes
wrong). Unless ``--no_verify``, onnxruntime's probabilities are compared with
JAX's on two random images and an export that differs by more than 1e-4 fails.

``--int8`` quantises the fp32 graph with onnxruntime's static post-training
quantisation (QDQ, per-channel weights, int8 activations), calibrated on
FER2013 Training faces. See docs/export.md for which model families convert and
what int8 costs.
"""
import argparse
import collections
import contextlib
import json
import logging
import math
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

import flax.linen.pooling
import jax
import jax.numpy as jnp
import numpy as np

from fer_jax import cli
from fer_jax import model_dir
from fer_jax.models import layers

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CALIBRATION = REPO_ROOT.parent / "shared" / "data" / "fer2013" / "fer2013.npz"
INSTALL_HINT = 'pip install -e ".[export]"'
ONNX2TF_HINT = ("python3.12 -m venv VENV && VENV/bin/pip install onnx2tf==2.6.9, then "
                "--onnx2tf=VENV/bin/onnx2tf")
OPSET = 23
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "va")
FORMATS = ("onnx", "tflite")
INPUT_DTYPES = ("uint8", "float32")
# onnxruntime's weights: 7 bits (reduce_range) run right on every x86 CPU.
INT8_WEIGHT_BITS = (7, 8)
DEFAULT_INT8_WEIGHT_BITS = 7
_ONNX_INPUT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
# Parity tolerance of the export's own check (probabilities, fp32).
VERIFY_ATOL = 1e-4
# The least top-1 agreement with JAX an int8 export may have on its calibration faces
# (the shipped student's: 98-99 %); below it the quantisation went wrong.
MIN_INT8_AGREEMENT = 0.9


class ExportError(Exception):
  """An export that cannot proceed; the message is one line for the user."""


# --- finding the model ---------------------------------------------------------------


def load_model(name_or_dir: str) -> model_dir.TrainedModel:
  try:
    return model_dir.load(name_or_dir)
  except model_dir.ModelDirError as e:
    raise ExportError(str(e)) from None


def require_extra() -> None:
  """Imports the export extra's packages, or says how to install them."""
  missing = []
  for module in ("jax2onnx", "onnx", "onnxruntime"):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise ExportError(f"export needs {', '.join(missing)} (the 'export' extra): "
                      f"{INSTALL_HINT}")


# --- the function that is exported ---------------------------------------------------


def inference_fn(trained: model_dir.TrainedModel) -> Callable:
  """uint8 images -> (logits,) or (logits, va); weights closed over.

  ``to_onnx`` turns the logits into probabilities with one ONNX Softmax."""
  variables = jax.tree.map(np.asarray, jax.device_get(trained.variables))

  def infer(images):
    logits, va = trained.forward(variables, images)
    if va.shape[-1]:  # the module's own V/A head (``num_va`` in model_kwargs)
      return logits.astype(jnp.float32), va.astype(jnp.float32)
    return (logits.astype(jnp.float32),)

  return infer


def input_spec(trained: model_dir.TrainedModel) -> jax.ShapeDtypeStruct:
  """uint8 ``[N, *image_shape]`` with a symbolic batch ``N``."""
  height, width, channels = trained.image_shape
  shape = jax.export.symbolic_shape(f"N, {height}, {width}, {channels}")
  return jax.ShapeDtypeStruct(shape, jnp.uint8)


def trace(trained: model_dir.TrainedModel, spec: jax.ShapeDtypeStruct):
  """The ClosedJaxpr of the exported function, traced by plain JAX.

  ``spec`` must be the very input spec given to jax2onnx afterwards: symbolic
  dimensions from two ``symbolic_shape`` calls belong to different scopes.
  """
  with layers.force_layer_forms("native"):
    return jax.make_jaxpr(inference_fn(trained))(spec)


def _foldable(eqn, invals) -> bool:
  """Whether an equation can be computed now: constant inputs, static output shapes."""
  return (not eqn.effects
          and not any(isinstance(v, jax.core.Tracer) for v in invals)
          and all(isinstance(d, (int, np.integer))
                  for var in eqn.outvars for d in getattr(var.aval, "shape", ())))


def _pad_with_minus_inf(x, axis: int, lo: int, hi: int):
  """-inf borders along one static axis, built from slices of ``x`` itself.

  ``lax.pad`` would do, but jax2onnx's Pad converter needs a static batch
  dimension; Slice, Min and Concat take a symbolic one.
  """
  if not (lo or hi):
    return x
  size = x.shape[axis]
  if not isinstance(size, (int, np.integer)) or lo > size or hi > size:
    return jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                       [(lo, hi, 0) if a == axis else (0, 0, 0) for a in range(x.ndim)])
  minus_inf = jnp.array(-jnp.inf, x.dtype)
  parts = [x]
  if lo:
    parts.insert(0, jnp.minimum(jax.lax.slice_in_dim(x, 0, lo, axis=axis), minus_inf))
  if hi:
    parts.append(jnp.minimum(jax.lax.slice_in_dim(x, size - hi, size, axis=axis), minus_inf))
  return jnp.concatenate(parts, axis=axis)


def _max_pool(x, *, window_dimensions, window_strides, padding, base_dilation,
              window_dilation):
  """``lax.reduce_window_max`` in a form jax2onnx converts, or None for none.

  A 2-D window over an NHWC map goes through ``flax.linen.pooling.pool``, looked
  up at call time: while jax2onnx traces, its Linen plugin swaps that function
  for one ONNX ``MaxPool`` between Transposes, which onnxruntime fuses into its
  blocked convolution layout. Padding comes first, as -inf borders. Any other
  window becomes the maximum of strided slices (Slice, Max).
  """
  if any(d != 1 for d in base_dilation):
    return None
  for axis, (lo, hi) in enumerate(padding):
    x = _pad_with_minus_inf(x, axis, lo, hi)
  spatial = slice(1, x.ndim - 1)
  if (x.ndim == 4 and all(d == 1 for d in window_dilation)
      and window_dimensions[0] == window_dimensions[-1] == 1
      and window_strides[0] == window_strides[-1] == 1):
    return flax.linen.pooling.pool(x, -jnp.inf, jax.lax.max, tuple(window_dimensions[spatial]),
                                   tuple(window_strides[spatial]), "VALID")
  out_shape = [(size - ((w - 1) * d + 1)) // s + 1 for size, w, s, d in
               zip(x.shape, window_dimensions, window_strides, window_dilation)]
  result = None
  for offsets in np.ndindex(*window_dimensions):
    start = [o * d for o, d in zip(offsets, window_dilation)]
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out_shape, window_strides)]
    tap = jax.lax.slice(x, start, limit, window_strides)
    result = tap if result is None else jnp.maximum(result, tap)
  return result


def _bind_params(eqn):
  """(subfuns, params) for ``primitive.bind``; jax < 0.7 returns both, later only params."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], dict):
    return bound
  return (), bound


_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
            "remat": "jaxpr", "checkpoint": "jaxpr"}


class _AffineConv:
  """A convolution with a constant kernel whose output is still to be scaled and
  shifted per output channel: ``conv(lhs, kernel) * 1 + bias``, built lazily so
  that the BatchNorm after it (``sub mean``, ``mul scale/sqrt(var)``, ``add
  beta``) folds into ``kernel`` and ``bias``. ``materialize()`` emits the conv."""

  def __init__(self, lhs, kernel, params: dict, out_ndim: int):
    dims = params["dimension_numbers"]
    self.lhs, self.params, self.out_ndim = lhs, params, out_ndim
    self.kernel = np.asarray(kernel)
    self.kernel_axis, self.channel_axis = dims.rhs_spec[0], dims.out_spec[1]
    self.channels = self.kernel.shape[self.kernel_axis]
    self.bias = None

  @staticmethod
  def applies(eqn, invals) -> bool:
    params = eqn.params
    return (len(invals) == 2 and isinstance(invals[0], jax.core.Tracer)
            and not isinstance(invals[1], jax.core.Tracer)
            and params.get("batch_group_count", 1) == 1
            and params.get("preferred_element_type") in (None, np.float32)
            and np.asarray(invals[1]).dtype == np.float32)

  def channel_vector(self, constant):
    """``constant`` as ``[C]`` if it only varies along the output channels, else None."""
    if isinstance(constant, jax.core.Tracer):
      return None
    value = np.asarray(constant)
    if value.dtype != np.float32 or value.ndim > self.out_ndim:
      return None
    shape = (1,) * (self.out_ndim - value.ndim) + value.shape
    if any(n != 1 for axis, n in enumerate(shape) if axis != self.channel_axis):
      return None
    if shape[self.channel_axis] not in (1, self.channels):
      return None
    return np.broadcast_to(value.reshape(-1), (self.channels,)).astype(np.float32)

  def apply(self, name: str, vector: np.ndarray) -> "_AffineConv":
    out = _AffineConv.__new__(_AffineConv)
    out.__dict__.update(self.__dict__)
    bias = np.zeros(self.channels, np.float32) if self.bias is None else self.bias
    if name == "add":
      out.bias = bias + vector
    elif name == "sub":
      out.bias = bias - vector
    else:  # mul, div: scale the kernel's output channels
      factor = vector if name == "mul" else np.float32(1) / vector
      shape = [1] * self.kernel.ndim
      shape[self.kernel_axis] = self.channels
      out.kernel = (self.kernel * factor.reshape(shape)).astype(np.float32)
      out.bias = None if self.bias is None else (self.bias * factor).astype(np.float32)
    return out

  def materialize(self):
    y = jax.lax.conv_general_dilated_p.bind(self.lhs, jnp.asarray(self.kernel), **self.params)
    if self.bias is not None:
      shape = [1] * self.out_ndim
      shape[self.channel_axis] = self.channels
      y = y + jnp.asarray(self.bias.reshape(shape))
    return y


_AFFINE_OPS = ("add", "sub", "mul", "div")


def _rewritten(eqn, invals, single_out: bool) -> list | None:
  """The outputs of ``eqn`` through one of the export's rewrites, or None for none."""
  name = eqn.primitive.name
  if name in _INLINED and _INLINED[name] in eqn.params:
    inner = eqn.params[_INLINED[name]]
    if isinstance(inner, jax.extend.core.ClosedJaxpr):
      return _evaluate(inner.jaxpr, inner.consts, invals)
    return _evaluate(inner, (), invals)
  if name == "stack":  # a lax primitive since jax 0.9; jax2onnx 0.13 has no converter
    axis = eqn.params["axis"]
    return [jax.lax.concatenate([jax.lax.expand_dims(v, (axis,)) for v in invals], axis)]
  if name == "reduce_window_max":
    pooled = _max_pool(invals[0], **eqn.params)
    return None if pooled is None else [pooled]
  if name == "conv_general_dilated" and single_out and _AffineConv.applies(eqn, invals):
    return [_AffineConv(invals[0], invals[1], _bind_params(eqn)[1],
                        len(eqn.outvars[0].aval.shape))]
  return None


def _bound(eqn, invals) -> list:
  """``eqn`` applied as is: folded to a constant when its inputs are, else traced."""
  subfuns, params = _bind_params(eqn)
  outvals = None
  if _foldable(eqn, invals):
    try:
      with jax.ensure_compile_time_eval():
        outvals = eqn.primitive.bind(*subfuns, *invals, **params)
    except Exception:  # e.g. dim_as_value of the symbolic batch: left in the graph
      outvals = None
  if outvals is None:
    outvals = eqn.primitive.bind(*subfuns, *invals, **params)
  return outvals if eqn.primitive.multiple_results else [outvals]


def _evaluate(jaxpr, consts: Sequence, args: Sequence) -> list:
  """Evaluates a jaxpr (see the module docstring for what it rewrites)."""
  env = {}
  uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars
                             if not isinstance(v, jax.extend.core.Literal))
  uses.update(v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal))

  def read(var, materialize=True):
    if isinstance(var, jax.extend.core.Literal):
      return var.val
    value = env[var]
    if materialize and isinstance(value, _AffineConv):
      value = env[var] = value.materialize()
    return value

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    single_out = len(eqn.outvars) == 1 and uses[eqn.outvars[0]] == 1
    if name in _AFFINE_OPS and single_out:
      lazy = [read(v, materialize=False) for v in eqn.invars]
      kinds = [isinstance(v, _AffineConv) for v in lazy]
      if kinds in ([True, False], [False, True]) and (name in ("add", "mul") or kinds[0]):
        conv, other = (lazy[0], lazy[1]) if kinds[0] else (lazy[1], lazy[0])
        vector = conv.channel_vector(other)
        if vector is not None and (name != "div" or np.all(vector != 0)):
          env[eqn.outvars[0]] = conv.apply(name, vector)
          continue
    invals = [read(v) for v in eqn.invars]
    outvals = _rewritten(eqn, invals, single_out)
    if outvals is None:
      outvals = _bound(eqn, invals)
    for var, value in zip(eqn.outvars, outvals):
      if not isinstance(var, jax.extend.core.DropVar):
        env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _fuse_activations(proto) -> None:
  """``Max(x, a) -> Min(., b)`` with scalar constants becomes ``Clip(x, a, b)`` and a
  lone ``Max(x, 0)`` becomes ``Relu(x)``, in place.

  jax2onnx writes ReLU6/ReLU as Max/Min; onnxruntime (and the int8 quantiser)
  fuse Clip and Relu into the preceding convolution, but not Max/Min.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel

  graph = proto.graph
  scalars = {}
  for init in graph.initializer:
    if init.data_type == onnx.TensorProto.FLOAT and math.prod(init.dims) == 1:
      scalars[init.name] = (init, float(numpy_helper.to_array(init).reshape(())))
  consumers = collections.defaultdict(list)
  for node in graph.node:
    for name in node.input:
      consumers[name].append(node)
  outputs = {o.name for o in graph.output}

  def split(node):
    """(tensor input, scalar constant input name, its value) of a binary Max/Min."""
    if len(node.input) != 2:
      return None
    for i in (0, 1):
      if node.input[1 - i] in scalars and node.input[i] not in scalars:
        return node.input[i], node.input[1 - i], scalars[node.input[1 - i]][1]
    return None

  def scalar_init(name, value):
    init = numpy_helper.from_array(np.array(value, np.float32), name)
    graph.initializer.append(init)
    return name

  replaced, dropped = {}, set()
  for index, node in enumerate(graph.node):
    if node.op_type != "Max" or id(node) in dropped:
      continue
    parts = split(node)
    if parts is None:
      continue
    x, _, low = parts
    users = consumers[node.output[0]]
    follower = users[0] if len(users) == 1 and node.output[0] not in outputs else None
    upper = split(follower) if follower is not None and follower.op_type == "Min" else None
    if upper is not None and upper[0] == node.output[0] and upper[2] >= low:
      lo = scalar_init(f"{node.output[0]}_clip_min", low)
      hi = scalar_init(f"{node.output[0]}_clip_max", upper[2])
      replaced[id(follower)] = onnx.helper.make_node(
          "Clip", [x, lo, hi], list(follower.output), name=f"{follower.name or index}_clip")
      dropped.add(id(node))
    elif low == 0.0:
      replaced[id(node)] = onnx.helper.make_node(
          "Relu", [x], list(node.output), name=f"{node.name or index}_relu")
  nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
  del graph.node[:]
  graph.node.extend(nodes)


def _prune_initializers(proto) -> None:
  graph = proto.graph
  used = {name for node in graph.node for name in node.input}
  kept = [i for i in graph.initializer if i.name in used]
  del graph.initializer[:]
  graph.initializer.extend(kept)


def _fold_gemm_bias(proto) -> None:
  """jax2onnx writes a Dense layer as ``Gemm(x, W[, 0]) -> Add(bias)``, with a
  scalar zero ``C`` or none; onnxruntime's quantiser cannot handle a scalar
  ``C``, and the Add is one more node. The Add's ``[N]`` or ``[1, N]`` constant
  becomes ``C`` (else a zero ``C`` is dropped), in place."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel

  graph = proto.graph
  inits = {i.name: i for i in graph.initializer}
  consumers = collections.defaultdict(list)
  for node in graph.node:
    for name in node.input:
      consumers[name].append(node)
  outputs = {o.name for o in graph.output}
  dropped = set()
  for node in graph.node:
    if (node.op_type != "Gemm" or not _zero_or_no_c(node, inits)
        or any(a.name == "transB" and a.i for a in node.attribute)):
      continue
    weight = inits.get(node.input[1])
    users = consumers[node.output[0]]
    add = users[0] if len(users) == 1 and node.output[0] not in outputs else None
    bias = _add_constant(add, node.output[0], inits) if add is not None else None
    if weight is not None and bias is not None and bias.size == weight.dims[1]:
      c_name = f"{add.output[0]}_gemm_c"
      graph.initializer.append(numpy_helper.from_array(bias.reshape(-1), c_name))
      del node.input[2:]
      node.input.append(c_name)
      node.output[0] = add.output[0]
      dropped.add(id(add))
      _set_float_attribute(node, "beta", 1.0)
    else:
      del node.input[2:]
  nodes = [n for n in graph.node if id(n) not in dropped]
  del graph.node[:]
  graph.node.extend(nodes)


def _zero_or_no_c(gemm, inits) -> bool:
  """Whether a Gemm adds nothing: no ``C``, a zero ``beta`` or an all-zero constant ``C``."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  if len(gemm.input) < 3 or not gemm.input[2]:
    return True
  if any(a.name == "beta" and a.f == 0.0 for a in gemm.attribute):
    return True
  return gemm.input[2] in inits and not numpy_helper.to_array(inits[gemm.input[2]]).any()


def _add_constant(add, other_input: str, inits) -> np.ndarray | None:
  """The constant that ``add`` adds to ``other_input``, when it is one."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  if add.op_type != "Add":
    return None
  rest = [name for name in add.input if name != other_input]
  if len(rest) != 1 or rest[0] not in inits:
    return None
  value = numpy_helper.to_array(inits[rest[0]])
  return value if value.ndim == 1 or value.ndim == 2 and value.shape[0] == 1 else None


def _set_float_attribute(node, name: str, value: float) -> None:
  import onnx  # pylint: disable=import-outside-toplevel
  kept = [a for a in node.attribute if a.name != name]
  del node.attribute[:]
  node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


def _op_from_error(error: BaseException) -> str:
  text = str(error)
  for pattern in (r"primitive '([\w.:-]+)'", r"running (\w+) node", r"Op \((\w+)\)",
                  r"No Op registered for (\w+)"):
    match = re.search(pattern, text)
    if match:
      return match.group(1)
  return ""


def _one_line(error: BaseException, limit: int = 300) -> str:
  first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  text = f"{type(error).__name__}: {first}" if first else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet_loggers():
  """Hides jax2onnx's warnings about its plugins for other libraries (dm_pix's
  fail to import under jax 0.10) and onnx_ir's about untyped shape values."""
  names = ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")
  saved = [logging.getLogger(n).level for n in names]
  for name in names:
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    yield
  finally:
    for name, level in zip(names, saved):
      logging.getLogger(name).setLevel(level)


def to_onnx(trained: model_dir.TrainedModel, opset: int = OPSET):
  """The fp32 ``onnx.ModelProto`` of ``trained`` (see the module docstring)."""
  require_extra()
  import jax2onnx  # pylint: disable=import-outside-toplevel

  spec = input_spec(trained)
  try:
    closed = trace(trained, spec)
  except Exception as e:  # the model itself does not trace with a symbolic batch
    raise ExportError(f"model {trained.model!r} does not trace for export: "
                      f"{_one_line(e)}") from e
  output_names = list(OUTPUT_NAMES[:len(closed.jaxpr.outvars)])

  def replay(images):
    logits, *rest = _evaluate(closed.jaxpr, closed.consts, [images])
    # Looked up at call time: while jax2onnx traces, jax.nn.softmax is its one
    # ONNX Softmax node instead of the dozen elementwise nodes of its jaxpr.
    return (jax.nn.softmax(logits, axis=-1), *rest)

  try:
    with _quiet_loggers():
      proto = jax2onnx.to_onnx(replay, [spec], model_name=trained.model,
                               opset=opset, input_names=[INPUT_NAME],
                               output_names=output_names)
  except Exception as e:
    op = _op_from_error(e)
    raise ExportError(f"model family {trained.model!r} does not convert to ONNX"
                      f"{f' (op {op})' if op else ''}: {_one_line(e)}") from e
  # Shape annotations of intermediate values are only hints; jax2onnx's are
  # sometimes wrong after its layout rewrites, which onnxruntime warns about.
  del proto.graph.value_info[:]
  _fuse_activations(proto)
  _fold_gemm_bias(proto)
  _prune_initializers(proto)
  _set_metadata(proto, trained, "uint8")
  return proto


def float_input(proto, trained: model_dir.TrainedModel):
  """``proto`` taking the pixels as float32 (0-255): its leading uint8 Cast removed.

  onnx2tf's int8 calibrator feeds float32 to the graph's input; the uint8 graph
  stops it (docs/export.md, 'TFLite').
  """
  import onnx  # pylint: disable=import-outside-toplevel
  cast, graph = proto.graph.node[0], proto.graph
  if cast.op_type != "Cast" or list(cast.input) != [INPUT_NAME]:
    raise ExportError(f"model family {trained.model!r}: the graph does not start with the "
                      f"input's Cast (found {cast.op_type}); float input is not supported")
  for node in graph.node:
    node.input[:] = [INPUT_NAME if x == cast.output[0] else x for x in node.input]
  graph.node.remove(cast)
  graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
  _set_metadata(proto, trained, "float32")
  return proto


def _set_metadata(proto, trained: model_dir.TrainedModel, input_dtype: str) -> None:
  meta = {
      "class_names": json.dumps(list(trained.class_names)),
      "image_shape": json.dumps(list(trained.image_shape)),
      "input": f"{input_dtype} NHWC face crops of image_shape, pixel values 0-255; "
               "preprocessing is in the graph",
      "fer_jax_model": trained.model,
      "fer_jax_model_kwargs": json.dumps(trained.spec()["model_kwargs"]),
      "num_va": str(trained.num_va),
  }
  del proto.metadata_props[:]
  for key, value in meta.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def session(model, threads: int | None = None):
  """An onnxruntime CPU session of a ModelProto, bytes or path."""
  require_extra()
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
  options.log_severity_level = 3
  if hasattr(model, "SerializeToString"):
    model = model.SerializeToString()
  elif isinstance(model, pathlib.Path):
    model = str(model)
  return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(sess, images: np.ndarray) -> dict[str, np.ndarray]:
  """Outputs of an exported model on uint8 images (as its input type), by name."""
  names = [o.name for o in sess.get_outputs()]
  images = images.astype(_ONNX_INPUT_DTYPES[sess.get_inputs()[0].type])
  return dict(zip(names, sess.run(names, {INPUT_NAME: np.ascontiguousarray(images)})))


def verify(trained: model_dir.TrainedModel, proto, images: np.ndarray,
           atol: float = VERIFY_ATOL) -> float:
  """Max |probability difference| of onnxruntime against JAX; ExportError past atol."""
  try:
    sess = session(proto)
    got = run(sess, images)
  except Exception as e:
    op = _op_from_error(e)
    raise ExportError(f"model family {trained.model!r} converts but onnxruntime cannot run "
                      f"it{f' (op {op})' if op else ''}: {_one_line(e)}") from e
  return _parity(trained, got, images, "ONNX", atol)


def _parity(trained: model_dir.TrainedModel, got: dict[str, np.ndarray], images: np.ndarray,
            what: str, atol: float) -> float:
  """Max |difference| of an exported model's outputs ``got`` from JAX's on ``images``."""
  logits, va = trained.apply(jnp.asarray(images))
  expected = OUTPUT_NAMES[:2 if va.shape[-1] else 1]
  if sorted(got) != sorted(expected):
    raise ExportError(f"model family {trained.model!r}: the {what} model's outputs are "
                      f"{sorted(got)}, expected {list(expected)}")
  want = np.asarray(jax.nn.softmax(logits, axis=-1))
  diff = float(np.max(np.abs(got["probabilities"] - want)))
  if va.shape[-1]:
    diff = max(diff, float(np.max(np.abs(got["va"] - np.asarray(va)))))
  if not diff <= atol:
    raise ExportError(f"model family {trained.model!r}: {what} output differs from JAX by "
                      f"{diff:.3g} (> {atol})")
  return diff


# --- int8 ----------------------------------------------------------------------------


def fer2013_faces(path: str | pathlib.Path, usage: int, count: int | None = None,
                  seed: int = 0) -> np.ndarray:
  """uint8 ``[n, 48, 48, 1]`` faces of one FER2013 split (0 Training, 1 PublicTest,
  2 PrivateTest); ``count`` of them drawn without replacement by ``seed``."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ExportError(f"no FER2013 npz at {path} (keys 'pixels', 'usage'); pass "
                      f"--calibration=PATH")
  with np.load(path) as data:
    index = np.flatnonzero(data["usage"] == usage)
    if count is not None and count < len(index):
      index = np.sort(np.random.default_rng(seed).choice(index, count, replace=False))
    pixels = data["pixels"][index]
  return pixels.astype(np.uint8)[..., None]


def adapt_images(images: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
  """uint8 ``[n, H, W, C]`` -> uint8 of ``image_shape`` (bilinear, grey <-> RGB)."""
  height, width, channels = image_shape
  if images.shape[1:3] != (height, width):
    resized = jax.image.resize(jnp.asarray(images, jnp.float32),
                               (len(images), height, width, images.shape[3]), "bilinear")
    images = np.asarray(jnp.clip(jnp.round(resized), 0, 255)).astype(np.uint8)
  if images.shape[3] != channels:
    if channels == 3 and images.shape[3] == 1:
      images = np.repeat(images, 3, axis=3)
    elif channels == 1:
      images = np.round(images.mean(axis=3, keepdims=True)).astype(np.uint8)
    else:
      raise ExportError(f"cannot convert {images.shape[3]} channels to {channels}")
  return images


class _Calibration:
  """onnxruntime's CalibrationDataReader over image batches (of the model's input type)."""

  def __init__(self, images: np.ndarray, batch_size: int = 32):
    self._batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    self._next = 0

  def get_next(self):
    if self._next >= len(self._batches):
      return None
    self._next += 1
    return {INPUT_NAME: self._batches[self._next - 1]}

  def rewind(self):
    self._next = 0


def quantize_int8(fp32_proto, calibration_images: np.ndarray,
                  weight_bits: int = DEFAULT_INT8_WEIGHT_BITS,
                  per_channel: bool = True):
  """Static post-training int8 quantisation (QDQ) of an exported fp32 model.

  ``weight_bits=7`` (onnxruntime's ``reduce_range``) keeps the weights within ±64. On
  x86 CPUs without VNNI (AVX2 only) onnxruntime multiplies int8 pairs with
  VPMADDUBSW, whose 16-bit sums saturate on full-range weights: there the width-9
  student's 40-epoch weights scored 59.32 % PrivateTest in their 8-bit export against
  65.20 % at 7 bits (fp32 65.70 %). 8 bits are for targets with VNNI or ARM's dot products.
  """
  require_extra()
  import onnx  # pylint: disable=import-outside-toplevel
  from onnxruntime import quantization  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    source, prepared, target = (pathlib.Path(tmp) / n for n in
                                ("fp32.onnx", "prepared.onnx", "int8.onnx"))
    onnx.save(fp32_proto, source)
    try:
      # Shape inference and graph optimisation first, as onnxruntime recommends:
      # BatchNorm folded into the convolutions, so it is quantised as one op.
      quantization.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception:  # pre-processing is an optimisation only
      prepared = source
    reader = _Calibration(calibration_images)
    # An int8 softmax would round the probabilities to steps of 1/256.
    softmax = [n.name for n in onnx.load(prepared).graph.node if n.op_type == "Softmax"]
    try:
      quantization.quantize_static(
          str(prepared), str(target), reader, quant_format=quantization.QuantFormat.QDQ,
          per_channel=per_channel, reduce_range=weight_bits == 7,
          activation_type=quantization.QuantType.QInt8,
          weight_type=quantization.QuantType.QInt8, nodes_to_exclude=softmax,
          calibrate_method=quantization.CalibrationMethod.MinMax,
          extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    except Exception as e:
      raise ExportError(f"int8 quantisation failed: {_one_line(e)}") from e
    proto = onnx.load(target)
  del proto.metadata_props[:]
  proto.metadata_props.extend(fp32_proto.metadata_props)
  entry = proto.metadata_props.add()
  entry.key = "quantization"
  entry.value = f"int8 static QDQ, per-channel {weight_bits}-bit weights"
  return proto


# --- TFLite --------------------------------------------------------------------------


def find_onnx2tf(executable: str) -> str:
  """The onnx2tf executable's path, or an ExportError that says how to install it."""
  found = shutil.which(executable) if executable else None
  if not found:
    raise ExportError(f"--format=tflite needs onnx2tf 2.6.x, which needs its own Python "
                      f"3.12 venv (--onnx2tf={executable or '(not given)'} is no "
                      f"executable): {ONNX2TF_HINT}")
  return found


def to_tflite(proto, onnx2tf: str, calibration_images: np.ndarray | None = None) -> bytes:
  """The TFLite flatbuffer onnx2tf's TF-free backend makes of ``proto``.

  With ``calibration_images`` (uint8), ``proto`` must take float32 pixels
  (``float_input``) and the model is onnx2tf's int8 ``integer_quant`` one.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    onnx.save(proto, tmp / "model.onnx")
    options, made = [], tmp / "tflite" / "model_float32.tflite"
    if calibration_images is not None:
      np.save(tmp / "calibration.npy", calibration_images.astype(np.float32))
      # mean 0 and std 1: the graph normalises the 0-255 pixels itself.
      options = ["-oiqt", "-cind", INPUT_NAME, str(tmp / "calibration.npy"), "[[[[0.]]]]",
                 "[[[[1.]]]]"]
      made = made.with_name("model_integer_quant.tflite")
    proc = subprocess.run(
        [onnx2tf, "-i", str(tmp / "model.onnx"), "-o", str(tmp / "tflite"), "-tb",
         "flatbuffer_direct", "-b", "1", "-kat", INPUT_NAME, *options],
        capture_output=True, text=True, check=False)
    # With -oiqt onnx2tf 2.6.9 exits 1 after writing the int8 files: its next variant
    # (int16 activations) fails its own validation ("SUB ... input1_shift <= 0").
    if not made.is_file():
      tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
      raise ExportError(f"onnx2tf did not write {made.name}: {tail[:300]}")
    return made.read_bytes()


def _tflite_input(images: np.ndarray, detail: dict) -> np.ndarray:
  """uint8 images as a TFLite input: its dtype, quantised when it is int8."""
  if detail["dtype"] == np.int8:
    scale, zero_point = detail["quantization"]
    return np.clip(np.round(images / scale + zero_point), -128, 127).astype(np.int8)
  return images.astype(detail["dtype"])


def _dequantized(value: np.ndarray, detail: dict) -> np.ndarray:
  if detail["dtype"] == np.float32:
    return value
  scale, zero_point = detail["quantization"]
  return (value.astype(np.float32) - zero_point) * scale


def tflite_outputs(model: bytes | str | pathlib.Path, images: np.ndarray) -> dict[str, np.ndarray]:
  """Outputs of a TFLite model (ai-edge-litert) for uint8 images, in one batch, by
  name (``probabilities``, and ``va`` for a model with a V/A head), as ``run`` gives
  them for ONNX.

  The input may be uint8, float32 pixels (0-255) or int8 with the file's scale and
  zero point (onnx2tf's full-integer model); quantised outputs are dequantised.
  """
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  interpreter = (Interpreter(model_content=model) if isinstance(model, bytes)
                 else Interpreter(model_path=str(model)))
  source = interpreter.get_input_details()[0]
  interpreter.resize_tensor_input(source["index"], list(images.shape))
  interpreter.allocate_tensors()
  interpreter.set_tensor(source["index"], _tflite_input(images, source))
  interpreter.invoke()
  # onnx2tf's integer_quant model names its float outputs '<onnx name>_dequantized_output'.
  return {d["name"].removesuffix("_dequantized_output"):
          _dequantized(interpreter.get_tensor(d["index"]), d)
          for d in interpreter.get_output_details()}


def verify_tflite(trained: model_dir.TrainedModel, model: bytes, images: np.ndarray,
                  atol: float = VERIFY_ATOL) -> float | None:
  """Max |difference| of the TFLite model's outputs from JAX's (None without
  ai-edge-litert); ExportError past ``atol``."""
  try:
    got = tflite_outputs(model, images)
  except ImportError:
    return None
  return _parity(trained, got, images, "TFLite", atol)


def int8_agreement(trained: model_dir.TrainedModel, fmt: str, model: bytes,
                   images: np.ndarray) -> float | None:
  """Top-1 agreement of a quantised model with JAX on uint8 ``images`` (None for a
  TFLite model without ai-edge-litert); ExportError below ``MIN_INT8_AGREEMENT``."""
  try:
    got = (tflite_outputs(model, images) if fmt == "tflite"
           else run(session(model), images))["probabilities"]
  except ImportError:
    return None
  want = np.asarray(trained.apply(jnp.asarray(images))[0])
  agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
  if agreement < MIN_INT8_AGREEMENT:
    raise ExportError(f"model family {trained.model!r}: the int8 model agrees with JAX on "
                      f"{100 * agreement:.1f} % of the calibration faces "
                      f"(< {100 * MIN_INT8_AGREEMENT:.0f} %); not written")
  return agreement


# --- the command ---------------------------------------------------------------------


def export(model: str, out: str | pathlib.Path, fmt: str = "onnx", int8: bool = False,
           calibration: str | pathlib.Path = DEFAULT_CALIBRATION,
           calibration_count: int = 300, verify_parity: bool = True,
           input_dtype: str = "uint8", onnx2tf: str = "onnx2tf",
           int8_weight_bits: int = DEFAULT_INT8_WEIGHT_BITS) -> dict:
  """Writes the exported model to ``out``; returns a summary."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  if input_dtype not in INPUT_DTYPES:
    raise ExportError(f"--input_dtype={input_dtype!r}: expected one of {INPUT_DTYPES}")
  if int8_weight_bits not in INT8_WEIGHT_BITS:
    raise ExportError(f"--int8_weight_bits={int8_weight_bits}: expected one of "
                      f"{INT8_WEIGHT_BITS}")
  if int8_weight_bits != DEFAULT_INT8_WEIGHT_BITS and (fmt != "onnx" or not int8):
    raise ExportError("--int8_weight_bits is for --format=onnx --int8; onnx2tf chooses the "
                      "TFLite model's own int8 weights")
  if fmt == "tflite" and input_dtype != "uint8":
    raise ExportError("--input_dtype is for --format=onnx: the TFLite model takes uint8 "
                      "(fp32) or float32 pixels (--int8)")
  require_extra()
  onnx2tf = find_onnx2tf(onnx2tf) if fmt == "tflite" else ""
  trained = load_model(model)
  calibration_images = None
  if int8:  # fail on a missing npz before the slow conversion
    calibration_images = adapt_images(
        fer2013_faces(calibration, usage=0, count=calibration_count), trained.image_shape)
  if fmt == "tflite" and int8:  # onnx2tf's calibrator feeds float32
    input_dtype = "float32"
  proto = to_onnx(trained)
  if input_dtype == "float32":
    proto = float_input(proto, trained)
  summary = {"model": trained.model, "out": str(out), "format": fmt, "int8": int8,
             "input_dtype": input_dtype, "class_names": list(trained.class_names)}
  check = np.random.default_rng(0).integers(0, 256, (2, *trained.image_shape), np.uint8)
  if verify_parity:
    summary["max_abs_diff_vs_jax"] = verify(trained, proto, check)
  if fmt == "tflite":
    data = to_tflite(proto, onnx2tf, calibration_images)
    if verify_parity and not int8:
      summary["tflite_max_abs_diff_vs_jax"] = verify_tflite(trained, data, check)
  else:
    if int8:
      proto = quantize_int8(proto, calibration_images.astype(input_dtype), int8_weight_bits)
    data = proto.SerializeToString()
  if int8:
    summary["calibration_images"] = len(calibration_images)
    if fmt == "onnx":
      summary["int8_weight_bits"] = int8_weight_bits
    summary["int8_top1_agreement_on_calibration"] = int8_agreement(
        trained, fmt, data, calibration_images)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(data)
  summary["bytes"] = out.stat().st_size
  return summary


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m fer_jax.export", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True,
                      help="model directory, or the name of one in fer_jax/pretrained/")
  parser.add_argument("--format", default="onnx", choices=FORMATS)
  parser.add_argument("--out", required=True, help="file to write (e.g. model.onnx)")
  parser.add_argument("--int8", action="store_true",
                      help="static int8 quantisation calibrated on FER2013 Training faces")
  parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                      help="FER2013 npz (keys pixels, usage) for --int8 calibration")
  parser.add_argument("--calibration_count", type=int, default=300)
  parser.add_argument("--int8_weight_bits", type=int, default=DEFAULT_INT8_WEIGHT_BITS,
                      choices=INT8_WEIGHT_BITS,
                      help="--format=onnx --int8: 7 runs right on every x86 CPU; 8 only "
                      "where onnxruntime has VNNI or ARM dot products (without, its int8 "
                      "sums saturate)")
  parser.add_argument("--onnx2tf", default="onnx2tf",
                      help="--format=tflite: the onnx2tf executable of a Python 3.12 venv")
  parser.add_argument("--input_dtype", default="uint8", choices=INPUT_DTYPES,
                      help="the graph's input type; float32 takes the pixels (0-255) as floats")
  parser.add_argument("--no_verify", action="store_true",
                      help="skip the parity checks against JAX on two images (onnxruntime; "
                      "fp32 TFLite when ai-edge-litert is installed)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    summary = export(args.model, args.out, args.format, args.int8, args.calibration,
                     args.calibration_count, verify_parity=not args.no_verify,
                     input_dtype=args.input_dtype, onnx2tf=args.onnx2tf,
                     int8_weight_bits=args.int8_weight_bits)
  except ExportError as e:
    return cli.report(e)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
