"""Building blocks shared by the model families.

``DepthwiseConv`` has two implementations behind one parameter layout.
XLA:CPU lowers a grouped convolution with one channel per group to a slow
generic loop. The same result written as a sum over the k*k taps of strided,
shifted slices of the padded input, each times a per-channel weight, is plain
elementwise work that XLA fuses. On a 3x3 layer (64x28x28x144, jax 0.10.2,
2 CPU cores) the shifted form was 21x faster forward and 6x faster
forward+backward at stride 1, and 4x / 3.6x at stride 2. Whole-model numbers
are in experiments/benchmarks/. 'auto' keeps the grouped convolution
off-CPU. One H100 run (MobileNetV2-1.0, 112 px, batch 64, jax 0.11.2) found
the shifted form faster there as well (1.4x inference, 1.6x training), so
'shifted' is worth measuring on accelerators. That single run was not enough
to change the default.

``Conv`` is nn.Conv with the same parameters, plus one CPU form for dense
stride-1 convolutions. The forward pass and the input gradient stay lax
convolutions. The kernel gradient becomes a scan over chunks of the batch,
each chunk one matmul of its k*k patches with the output gradient. XLA:CPU
lowers the kernel gradient of a lax convolution (a convolution that contracts
over the batch) 3-20x slower than the forward pass. On the CPU tier's 3x3
layers at batch 128, the patch form cut forward + backward from 1.2-7.9x
PyTorch's time to 1.2-2.5x (2 AMD EPYC cores; experiments/benchmarks/conv_wall.md).
1x1 convolutions (FPN laterals, MKD's adapters, pointwise convs) were the worst
case: lax's kernel gradient of a 128x24x24x32 -> 64 layer took 470 ms against
18-26 ms as one matmul per chunk (experiments/benchmarks/op_profile.md found them).

``max_pool2`` has a CPU form too, a reshape and a max, because XLA:CPU's
select-and-scatter (the gradient of a max-pool) is slow.

The CPU forms take 'auto' on the CPU backend and leave every other backend
on lax ops. ``force_layer_forms`` (``--layer_forms`` in fer_jax.main) forces
one choice.

Convolutions here pad symmetrically by ``k // 2`` (the PyTorch convention of
the reference implementations), not TF's 'SAME', so stride-2 layers see the same
pixels as the published models and weights port across without a shift.
"""
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = Union[str, int, Sequence[tuple[int, int]]]

DEPTHWISE_IMPLS = ("auto", "native", "shifted")
CONV_IMPLS = ("auto", "native", "patch_grad")
# What force_layer_forms accepts: lax convolutions and pooling everywhere, or the CPU forms.
LAYER_FORMS = ("native", "cpu")

_forced_forms: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "forced_forms", default=None)

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 1 - 0.9 here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Bytes of k*k patches per chunk of the CPU kernel gradient: 4 MiB was the
# fastest of 2, 4 and 8 on the CPU tier's 3x3 layers (2 cores).
PATCH_CHUNK_BYTES = 4 << 20


@contextlib.contextmanager
def force_layer_forms(impl: str) -> Iterator[None]:
  """Makes every ``Conv``, ``DepthwiseConv`` and ``max_pool2`` traced inside the block use one form.

  'native' gives plain lax convolutions and pooling (the MAC counter and the
  ONNX export need them); 'cpu' gives the CPU forms (shifted depthwise, patch
  kernel gradient, reshape pooling) on any backend. The switch acts at trace
  time. A function that was already jit-compiled keeps the implementation it
  was traced with.

  Args:
    impl: 'native' or 'cpu'.
  """
  if impl not in LAYER_FORMS:
    raise ValueError(
        f"force_layer_forms: impl must be one of {LAYER_FORMS}, got {impl!r}")
  token = _forced_forms.set(impl)
  try:
    yield
  finally:
    _forced_forms.reset(token)


def _cpu_forms() -> bool:
  """Whether layers take their CPU forms: forced, or by default on the CPU backend."""
  forced = _forced_forms.get()
  return forced == "cpu" if forced is not None else jax.default_backend() == "cpu"


def _resolve(impl: str, field: str, choices: tuple[str, ...]) -> str:
  """'native' or the CPU form ``choices[-1]`` for an 'auto' | 'native' | CPU-form value."""
  if impl not in choices:
    raise ValueError(f"{field} must be one of {choices}, got {impl!r}")
  if _forced_forms.get() is not None or impl == "auto":
    return choices[-1] if _cpu_forms() else "native"
  return impl


def resolve_depthwise_impl(impl: str) -> str:
  """Returns 'native' or 'shifted' for a ``DepthwiseConv.impl`` value.

  An active ``force_layer_forms`` block takes precedence over ``impl``.
  """
  return _resolve(impl, "DepthwiseConv.impl", DEPTHWISE_IMPLS)


def resolve_conv_impl(impl: str) -> str:
  """Returns 'native' or 'patch_grad' for a ``Conv.impl`` value, like ``resolve_depthwise_impl``."""
  return _resolve(impl, "Conv.impl", CONV_IMPLS)


def _pair(value: int | Sequence[int], field: str) -> tuple[int, int]:
  """``(v, v)`` for an int ``v``; a pair of ints as it is; ``field`` names it in errors."""
  if isinstance(value, int):
    return value, value
  pair = tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
    raise ValueError(f"{field} must be an int or two ints, got {value!r}")
  return pair


def _padding_pairs(padding: Padding, spatial: tuple[int, int],
                   kernel_size: tuple[int, int],
                   strides: tuple[int, int]) -> list[tuple[int, int]]:
  """Converts nn.Conv-style padding into explicit (low, high) pairs per axis."""
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(
          f"DepthwiseConv.padding must be 'SAME', 'VALID', an int or (low, high) "
          f"pairs, got {padding!r}")
    return list(jax.lax.padtype_to_pads(spatial, kernel_size, strides, padding))
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  pairs = [tuple(p) for p in padding]
  if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
    raise ValueError(
        f"DepthwiseConv.padding pairs must be ((top, bottom), (left, right)), got {padding!r}")
  return pairs


def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array,
                           strides: tuple[int, int],
                           padding: Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise convolution as a sum of strided shifted slices.

  Autodiff gives the backward pass. A hand-written VJP in the same gather form
  was tried and was no faster: the k*k per-channel reductions of the kernel
  gradient dominate either way.

  Args:
    x: ``[B, H, W, C]`` input.
    kernel: ``[kh, kw, 1, C]``, the layout of nn.Conv's depthwise kernel.
    strides: (sh, sw).
    padding: explicit ((top, bottom), (left, right)).

  Returns:
    ``[B, H', W', C]``, equal to ``lax.conv_general_dilated`` with
    ``feature_group_count=C``.
  """
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  batch, height, width, channels = x.shape
  out_h = (height - kh) // sh + 1
  out_w = (width - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(
          x, (0, i, j, 0),
          (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, channels),
          (1, sh, sw, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """A depthwise 2-D convolution (one filter per channel) over NHWC input.

  Attributes:
    kernel_size: filter size, an int or (kh, kw).
    strides: an int or (sh, sw).
    padding: 'SAME', 'VALID', an int (symmetric) or ((top, bottom), (left,
      right)), as for nn.Conv.
    use_bias: add a per-channel bias (nn.Conv's default is True as well).
    impl: 'native' (a grouped lax convolution, i.e. nn.Conv with
      ``feature_group_count=C``), 'shifted' (sum of shifted slices, fast on
      XLA:CPU) or 'auto' (shifted on CPU, native elsewhere). Both store the
      same ``kernel`` ``[kh, kw, 1, C]`` (and ``bias`` ``[C]``), so checkpoints
      move between backends.
    kernel_init: initializer of the kernel. The default is nn.Conv's, whose
      fan-in for this shape is kh*kw.
    bias_init: initializer of the bias.
  """
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"DepthwiseConv expects NHWC input, got shape {x.shape}")
    channels = x.shape[-1]
    kernel_size = _pair(self.kernel_size, "DepthwiseConv.kernel_size")
    strides = _pair(self.strides, "DepthwiseConv.strides")
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, 1, channels))
    padding = _padding_pairs(self.padding, x.shape[1:3], kernel_size, strides)
    if resolve_depthwise_impl(self.impl) == "native":
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=strides, padding=padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    else:
      y = shifted_depthwise_conv(x, kernel, strides, padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (channels,))
    return y


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: Sequence[tuple[int, int]]) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _patches(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
  """``[B, H, W, kh*kw*C]``: the taps of each output pixel of a stride-1 conv
  over an already padded ``x``, tap-major like an HWIO kernel."""
  kh, kw = kernel_size
  height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return jnp.concatenate([x[:, i:i + height, j:j + width]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _batch_chunk(shape: tuple[int, ...], kernel_size: tuple[int, int], itemsize: int) -> int:
  """The largest power-of-two divisor of the batch whose patches fit PATCH_CHUNK_BYTES."""
  batch, height, width, channels = shape
  per_image = height * width * kernel_size[0] * kernel_size[1] * channels * itemsize
  chunk = 1
  while batch % (2 * chunk) == 0 and 2 * chunk * per_image <= PATCH_CHUNK_BYTES:
    chunk *= 2
  return chunk


def _patch_kernel_grad(x: jax.Array, grad_out: jax.Array, kernel_shape: tuple[int, ...],
                       padding: Sequence[tuple[int, int]]) -> jax.Array:
  """The kernel gradient of a stride-1 convolution, summed over batch chunks."""
  kernel_size, (channels, features) = kernel_shape[:2], kernel_shape[2:]
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  chunk = _batch_chunk(x.shape, kernel_size, x.dtype.itemsize)
  x = x.reshape(-1, chunk, *x.shape[1:])
  grad_out = grad_out.reshape(-1, chunk, *grad_out.shape[1:])

  def add_chunk(total, chunk_pair):
    images, grads = chunk_pair
    taps = _patches(images, kernel_size).reshape(-1, total.shape[0])
    return total + taps.T @ grads.reshape(-1, features), None

  total = jnp.zeros((kernel_size[0] * kernel_size[1] * channels, features),
                    jnp.result_type(x, grad_out))
  total, _ = jax.lax.scan(add_chunk, total, (x, grad_out))
  return total.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def patch_grad_conv(x: jax.Array, kernel: jax.Array,
                    padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """A stride-1 convolution whose kernel gradient is a chunked patch matmul.

  Equal to ``lax.conv_general_dilated`` (NHWC, HWIO) in value and gradients.
  The input gradient is the convolution of the output gradient with the
  flipped kernel, which needs ``padding`` to keep the size (odd kernel sides,
  symmetric ``k // 2`` on each axis, as every caller here pads). A 1x1 kernel's
  patches are the input itself: its kernel gradient is one matmul per chunk.
  """
  return _lax_conv(x, kernel, (1, 1), padding)


def _patch_grad_conv_forward(x, kernel, padding):
  return _lax_conv(x, kernel, (1, 1), padding), (x, kernel)


def _patch_grad_conv_backward(padding, residuals, grad_out):
  x, kernel = residuals
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  grad_x = _lax_conv(grad_out, flipped, (1, 1), padding)
  return grad_x, _patch_kernel_grad(x, grad_out, kernel.shape, padding)


patch_grad_conv.defvjp(_patch_grad_conv_forward, _patch_grad_conv_backward)


class Conv(nn.Module):
  """nn.Conv (NHWC, same ``kernel`` ``[kh, kw, C, F]`` and ``bias``) with a CPU form.

  Attributes:
    features: output channels.
    kernel_size: filter size, square (an int) or ``(kh, kw)``.
    strides: square stride.
    padding: symmetric padding per side (PyTorch style), one int for both axes;
      None is ``k // 2`` on each axis (nn.Conv's 'SAME' for odd kernels).
    use_bias: add a per-channel bias.
    impl: 'native' (lax convolution, autodiff), 'patch_grad' (``patch_grad_conv``
      where it applies: stride 1, odd kernel sides, ``k // 2`` padding; 1x1
      included, whose lax kernel gradient was 20x slower on 2 cores) or
      'auto' (patch_grad on CPU, native elsewhere). Checkpoints are the same.
    kernel_init: initializer of the kernel (the bias starts at zero).
  """
  features: int
  kernel_size: int | tuple[int, int] = 3
  strides: int = 1
  padding: int | None = None
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = _pair(self.kernel_size, "Conv.kernel_size")
    same_pads = tuple(k // 2 for k in kernel_size)
    pads = same_pads if self.padding is None else (self.padding,) * 2
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features))
    padding = tuple((p, p) for p in pads)
    same_size = (self.strides == 1 and all(k % 2 == 1 for k in kernel_size)
                 and pads == same_pads)
    if same_size and resolve_conv_impl(self.impl) == "patch_grad":
      y = patch_grad_conv(x, kernel, padding)
    else:
      y = _lax_conv(x, kernel, (self.strides, self.strides), padding)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return y


def max_pool2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 (odd trailing rows and columns dropped).

  The CPU form is a reshape and a max, whose gradient is elementwise: XLA:CPU's
  select-and-scatter, the gradient of ``nn.max_pool``, took 88 ms against
  14 ms on 128x48x48x16 (2 cores). Where a window holds tied maxima the CPU
  form splits the gradient among them; after a ReLU such ties are zeros,
  whose gradient the ReLU stops either way.
  """
  if not _cpu_forms():
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults, statistics in 'batch_stats'."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, name=name)


class ConvBN(nn.Module):
  """Convolution (dense or depthwise) followed by BatchNorm, no activation.

  Padding is symmetric ``kernel_size // 2`` (PyTorch style), or none with
  ``valid=True``.

  Attributes:
    features: output channels. Ignored when ``depthwise`` (the input's channel
      count is kept).
    kernel_size: square filter size.
    strides: square stride.
    depthwise: use ``DepthwiseConv`` instead of a dense nn.Conv.
    use_bias: a conv bias before the BatchNorm (the EfficientFormer reference
      has one; most mobile nets do not).
    valid: no padding, e.g. for a global depthwise conv covering the whole map.
    depthwise_impl: ``DepthwiseConv.impl``.
    kernel_init: conv kernel initializer.
  """
  features: int | None
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  use_bias: bool = False
  valid: bool = False
  depthwise_impl: str = "auto"
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    padding = 0 if self.valid else self.kernel_size // 2
    if self.depthwise:
      x = DepthwiseConv(self.kernel_size, self.strides, padding, self.use_bias,
                        self.depthwise_impl, self.kernel_init, name="conv")(x)
    else:
      x = Conv(self.features, self.kernel_size, self.strides, padding, self.use_bias,
               kernel_init=self.kernel_init, name="conv")(x)
    return batch_norm(train, name="bn")(x)


class ChannelPReLU(nn.Module):
  """PReLU with one learned slope per channel (``torch.nn.PReLU(C)``).

  nn.PReLU learns a single scalar slope; MobileFaceNet uses one per channel.
  """
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("slope", nn.initializers.constant(self.init_slope), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope * x)


class Heads(nn.Module):
  """Classifier and optional valence/arousal regressor on a pooled embedding.

  Returns ``(logits, extras)``. ``extras`` holds 'va' (``[B, num_va]``,
  unbounded) when ``num_va > 0``, as the model contract asks.

  Attributes:
    num_classes: classifier outputs.
    num_va: regression outputs (0 for none).
    dropout_rate: dropout on the embedding before both heads.
    kernel_init: initializer of both Dense kernels.
  """
  num_classes: int
  num_va: int = 0
  dropout_rate: float = 0.0
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, embedding: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    logits = nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="classifier")(h)
    extras = {}
    if self.num_va > 0:
      extras["va"] = nn.Dense(self.num_va, kernel_init=self.kernel_init, name="va_head")(h)
    return logits, extras


class DropPath(nn.Module):
  """Stochastic depth: drops a residual branch for whole samples.

  Kept samples are scaled by 1 / (1 - rate). Draws from the 'dropout' stream.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)),
                      deterministic=not train)(x)
