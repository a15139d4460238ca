"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018, arXiv:1801.04381).

Layout, channel rounding and initialisation follow the reference
implementation (torchvision ``mobilenet_v2``). At 224x224x3 with 1000 classes
and width 1.0 that is 3.50 M parameters and 0.30 G MACs, the student of Lee et
al. 2023.

Stages (``aux`` keys) end where the resolution changes. Spatial sizes for the
'imagenet' stem at 224 px (and at 112 px):

  ==========  ================================  ============  ============
  key         layers                            224 px        112 px
  ==========  ================================  ============  ============
  'stem'      conv 3x3 s2, 32 ch                112           56
  'stage1'    block t1 c16                      112           56
  'stage2'    blocks c24                        56            28
  'stage3'    blocks c32                        28            14
  'stage4'    blocks c64, c96                   14            7
  'stage5'    blocks c160, c320, conv 1x1 1280  7             4
  ==========  ================================  ============  ============

The 'small' stem (our choice for 48x48 FER2013 faces; the paper has no
such variant) makes the stem conv and the first stride-2 block (c24) stride 1.
This cuts the total stride from 32 to 8, so a 48 px face ends at 6x6, the
final map size that a 192 px image gets with the ImageNet stem. At 48 px the stem, stage1 and stage2 maps are 48x48, then
stage3 24, stage4 12 and stage5 6. Channel widths are unchanged. The
alternative, keeping the c24 block at stride 2, would end at 3x3.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.base import MODELS

# (expansion t, output channels c, repeats n, first stride s) from Table 2.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Index into INVERTED_RESIDUAL_SETTINGS of the group that closes each stage.
_STAGE_ENDS = {0: "stage1", 1: "stage2", 2: "stage3", 4: "stage4"}
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
STEMS = ("imagenet", "small")

# torchvision's init: Kaiming-normal (fan-out) convs, N(0, 0.01) classifier.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DENSE_INIT = nn.initializers.normal(0.01)


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to the nearest multiple of ``divisor``.

  The rounded value never drops below 90 % of ``value`` (the reference
  ``_make_divisible``).
  """
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class InvertedResidual(nn.Module):
  """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, residual when shapes match."""
  features: int
  strides: int
  expansion: int
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    h = x
    if self.expansion != 1:
      h = layers.ConvBN(in_features * self.expansion, kernel_init=_CONV_INIT,
                        name="expand")(h, train)
      h = jax.nn.relu6(h)
    h = layers.ConvBN(None, 3, self.strides, depthwise=True, depthwise_impl=self.depthwise_impl,
                      kernel_init=_CONV_INIT, name="depthwise")(h, train)
    h = jax.nn.relu6(h)
    h = layers.ConvBN(self.features, kernel_init=_CONV_INIT, name="project")(h, train)
    if self.strides == 1 and in_features == self.features:
      h = h + x
    return h


class MobileNetV2(nn.Module):
  """MobileNetV2 classifier returning ``(logits, aux)`` (see models/base.py).

  Attributes:
    num_classes: classifier outputs.
    num_va: valence/arousal outputs (0: none).
    width: width multiplier; channels are rounded to multiples of 8, and the
      last conv keeps 1280 channels unless width > 1.
    stem: 'imagenet' (stride-2 stem, for 112/224 px) or 'small' (stride-1 stem
      and stride-1 first c24 block, for 48 px); see the module docstring.
    dropout_rate: dropout before the classifier (0.2 in the reference).
    depthwise_impl: ``layers.DepthwiseConv.impl``.
  """
  num_classes: int
  num_va: int = 0
  width: float = 1.0
  stem: str = "imagenet"
  dropout_rate: float = 0.2
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    if self.stem not in STEMS:
      raise ValueError(f"MobileNetV2.stem must be one of {STEMS}, got {self.stem!r}")
    small = self.stem == "small"
    aux = {}
    h = layers.ConvBN(make_divisible(STEM_CHANNELS * self.width), 3, 1 if small else 2,
                      kernel_init=_CONV_INIT, name="stem")(x, train)
    h = aux["stem"] = jax.nn.relu6(h)
    for group, (expansion, channels, repeats, first_stride) in enumerate(
        INVERTED_RESIDUAL_SETTINGS):
      if small and group == 1:
        first_stride = 1
      for i in range(repeats):
        h = InvertedResidual(make_divisible(channels * self.width),
                             first_stride if i == 0 else 1, expansion, self.depthwise_impl,
                             name=f"block{group}_{i}")(h, train)
      if group in _STAGE_ENDS:
        aux[_STAGE_ENDS[group]] = h
    last_channels = make_divisible(LAST_CHANNELS * max(1.0, self.width))
    h = layers.ConvBN(last_channels, kernel_init=_CONV_INIT, name="head_conv")(h, train)
    h = aux["stage5"] = jax.nn.relu6(h)
    aux["embedding"] = jnp.mean(h, axis=(1, 2))
    logits, extras = layers.Heads(self.num_classes, self.num_va, self.dropout_rate,
                                  _DENSE_INIT, name="heads")(aux["embedding"], train)
    aux.update(extras)
    return logits, aux


MODELS.register("mobilenet_v2")(MobileNetV2)
