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

Convolutions here pad symmetrically by ``k // 2`` (the PyTorch convention of
the reference implementations), not TF's 'SAME', so stride-2 layers see the same
pixels as the published models and weights port across without a shift.
"""
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = Union[str, int, Sequence[tuple[int, int]]]

DEPTHWISE_IMPLS = ("auto", "native", "shifted")

_forced_depthwise_impl: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "forced_depthwise_impl", default=None)

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 1 - 0.9 here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@contextlib.contextmanager
def force_depthwise_impl(impl: str) -> Iterator[None]:
  """Makes every ``DepthwiseConv`` traced inside the block use ``impl``.

  The MAC counter forces 'native', so that depthwise layers appear as
  convolutions in the traced program. The switch acts at trace time. A function
  that was already jit-compiled keeps the implementation it was traced with.

  Args:
    impl: 'native' or 'shifted'.
  """
  if impl not in ("native", "shifted"):
    raise ValueError(
        f"force_depthwise_impl: impl must be 'native' or 'shifted', got {impl!r}")
  token = _forced_depthwise_impl.set(impl)
  try:
    yield
  finally:
    _forced_depthwise_impl.reset(token)


def resolve_depthwise_impl(impl: str) -> str:
  """Returns 'native' or 'shifted' for a ``DepthwiseConv.impl`` value.

  An active ``force_depthwise_impl`` block takes precedence over ``impl``.
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"DepthwiseConv.impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
  forced = _forced_depthwise_impl.get()
  if forced is not None:
    return forced
  if impl == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "native"
  return impl


def _pair(value: int | Sequence[int], field: str) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  pair = tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
    raise ValueError(f"DepthwiseConv.{field} must be an int or two ints, got {value!r}")
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
    kernel_size = _pair(self.kernel_size, "kernel_size")
    strides = _pair(self.strides, "strides")
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
      x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), self.strides,
                  padding, use_bias=self.use_bias, kernel_init=self.kernel_init,
                  name="conv")(x)
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
