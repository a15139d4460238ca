"""EmoNet: expression, valence and arousal from a face-alignment network.

A. Toisoul, J. Kossaifi, A. Bulat, G. Tzimiropoulos, M. Pantic, "Estimation of
continuous valence and arousal levels from faces in naturalistic conditions",
Nature Machine Intelligence 3, 42-50 (2021); official PyTorch code
github.com/face-analysis/emonet (``emonet/models/emonet.py``). It is the teacher
of Lee, Kim & Lee, Applied Sciences 13(11) 6409 (2023).

This is a layer-for-layer restatement of the official module, so the released
weights convert one to one (``fer_jax.convert.emonet_torch``):

  * a face-alignment network (FAN): a stem (conv7x7/2 + BN + ReLU, ConvBlocks,
    a 2x2 max-pool) and ``n_stacks`` stacked hourglasses that predict 68
    landmark heatmaps;
  * heatmap attention: the per-stack hourglass features are multiplied by the
    sum of the last stack's 68 heatmaps and concatenated after the stem map;
  * an emotion head: conv1x1 to 256 channels, ``num_head_blocks`` x
    [ConvBlock + max-pool 2], AvgPool(4), FC 256->128, BN, ReLU and one FC to
    ``num_classes`` expression logits followed by valence and arousal.

Every norm is BatchNorm (the official code aliases InstanceNorm2d to
BatchNorm2d) with PyTorch's epsilon 1e-5 and momentum 0.1, i.e. Flax momentum
0.9. One difference remains when training: Flax updates the running variance
with the biased batch variance, PyTorch with the unbiased one.

Freezing. The official model sets ``requires_grad=False`` on every FAN
parameter, stem included. Here the FAN (stem included) lives under the
top-level submodule ``'fan'``, so a trainer can exclude it with an optax mask,
and its outputs pass through ``jax.lax.stop_gradient``, so no gradient reaches
FAN parameters. Unlike ``requires_grad=False`` this also stops gradients to the
input image. The official code is silent on the FAN's BatchNorm in training
mode (PyTorch's ``model.train()`` would normalise it with batch statistics and
move its running averages); ``freeze_fan_batch_stats`` (default True) keeps it
on its running averages, so the frozen landmark detector stays a fixed
function. Set it False for the literal PyTorch behaviour.

Input: RGB in [0, 1], no mean/std normalisation, NHWC, 256x256 (the
hourglasses need a stem map divisible by 16 and the head's AvgPool(4) a final
map of 4-7 pixels). A 1-channel input is repeated to RGB.

Licence: the official code and weights are CC BY-NC-ND 4.0; fer_jax ships no
EmoNet weights.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.base import MODELS

NUM_LANDMARKS = 68
FAN_WIDTH = 256
HOURGLASS_DEPTH = 4
HEAD_WIDTH = 256
EMBEDDING_WIDTH = 128

# PyTorch's BatchNorm: eps 1e-5, running = 0.9 * running + 0.1 * batch, and a
# two-pass batch variance (Flax's default E[x^2] - E[x]^2 loses precision on
# the large activations the heatmap attention produces).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5,
                              use_fast_variance=False)


def input_size(num_head_blocks: int = 4) -> int:
  """The square input side the official layout is built for (256 for 4 blocks).

  The stem divides the side by 4 and each head block by 2, and the head's
  AvgPool(4) must see a 4x4 map.
  """
  return 16 * 2**num_head_blocks


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling (``F.interpolate(scale_factor=2)``)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _check_input(x: jax.Array, num_head_blocks: int) -> jax.Array:
  """Validates an NHWC batch and returns it with 3 channels."""
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"emonet: input must be NHWC with 1 or 3 channels, got "
                     f"shape {x.shape}")
  for side in x.shape[1:3]:
    stem_side = -(-side // 2) // 2  # conv7x7/2 with padding 3, then max-pool 2
    head_side = stem_side // 2**num_head_blocks
    if stem_side % 2**HOURGLASS_DEPTH or not 4 <= head_side < 8:
      raise ValueError(
          f"emonet: input is {x.shape[1]}x{x.shape[2]}, but the hourglasses "
          f"need a stem map divisible by {2**HOURGLASS_DEPTH} and the head's "
          f"AvgPool(4) a final map of 4-7 pixels; use "
          f"{input_size(num_head_blocks)}x{input_size(num_head_blocks)} "
          f"(num_head_blocks={num_head_blocks})")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return x


class ConvBlock(nn.Module):
  """The FAN residual block (Bulat & Tzimiropoulos 2017).

  Three chained pre-activation BN-ReLU-conv3x3 branches of widths
  ``features/2``, ``features/4``, ``features/4``, each fed by the previous
  one; their outputs are concatenated and added to the input, which passes
  through BN-ReLU-conv1x1 when its width differs.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:

    def bn_relu_conv(y, features, kernel, suffix):
      y = nn.relu(
          BatchNorm(use_running_average=not train, name=f"bn{suffix}")(y))
      return layers.Conv(features, kernel, use_bias=False, name=f"conv{suffix}")(y)

    out1 = bn_relu_conv(x, self.features // 2, 3, 1)
    out2 = bn_relu_conv(out1, self.features // 4, 3, 2)
    out3 = bn_relu_conv(out2, self.features // 4, 3, 3)
    residual = x
    if x.shape[-1] != self.features:
      residual = bn_relu_conv(x, self.features, 1, "_downsample")
    return jnp.concatenate([out1, out2, out3], axis=-1) + residual


class HourGlass(nn.Module):
  """A recursive hourglass: at each level a full-resolution ConvBlock branch
  plus a max-pooled branch that recurses and is upsampled back."""
  depth: int = HOURGLASS_DEPTH

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:

    def level(y, depth):
      # Block names follow the official module (b1_4 ... b3_1, b2_plus_1).
      up = ConvBlock(FAN_WIDTH, name=f"b1_{depth}")(y, train)
      low = ConvBlock(FAN_WIDTH, name=f"b2_{depth}")(layers.max_pool2(y), train)
      if depth > 1:
        low = level(low, depth - 1)
      else:
        low = ConvBlock(FAN_WIDTH, name=f"b2_plus_{depth}")(low, train)
      low = ConvBlock(FAN_WIDTH, name=f"b3_{depth}")(low, train)
      return up + _upsample2(low)

    return level(x, self.depth)


class FaceAlignmentNetwork(nn.Module):
  """Stem + stacked hourglasses (Bulat & Tzimiropoulos, ICCV 2017).

  Returns ``(stem, features, heatmaps)``: the 256-channel stem map, the
  per-stack features concatenated along channels (``256 * n_stacks``) and the
  last stack's 68 landmark heatmaps. Submodule names are the official ones.
  """
  n_stacks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    norm = functools.partial(BatchNorm, use_running_average=not train)
    x = nn.Conv(64, (7, 7), strides=2, padding=3, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = layers.max_pool2(ConvBlock(128, name="conv2")(x, train))
    x = ConvBlock(128, name="conv3")(x, train)
    stem = ConvBlock(FAN_WIDTH, name="conv4")(x, train)

    previous = stem
    features = []
    for i in range(self.n_stacks):
      y = HourGlass(name=f"m{i}")(previous, train)
      y = ConvBlock(FAN_WIDTH, name=f"top_m_{i}")(y, train)
      y = nn.Conv(FAN_WIDTH, (1, 1), name=f"conv_last{i}")(y)
      y = nn.relu(norm(name=f"bn_end{i}")(y))
      heatmaps = nn.Conv(NUM_LANDMARKS, (1, 1), name=f"l{i}")(y)
      if i < self.n_stacks - 1:
        # As in the official code, the stack's emitted feature is the
        # remapped one that also feeds the next stack.
        y = nn.Conv(FAN_WIDTH, (1, 1), name=f"bl{i}")(y)
        previous = previous + y + nn.Conv(FAN_WIDTH, (1, 1),
                                          name=f"al{i}")(heatmaps)
      features.append(y)
    return stem, jnp.concatenate(features, axis=-1), heatmaps


@MODELS.register("emonet")
class EmoNet(nn.Module):
  """EmoNet with heatmap attention (the released configuration).

  Attributes:
    num_classes: expression classes (8 or 5 for the released weights).
    num_va: regression outputs after the logits: 2 (valence, arousal, in this
      order, as the official ``final_features[:, -2]`` / ``[:, -1]``) or 0.
    n_stacks: stacked hourglasses in the FAN (official ``num_modules``).
    num_head_blocks: ConvBlock + max-pool blocks in the emotion head (official
      ``n_blocks``); fewer blocks suit a smaller input (``input_size``).
    freeze_fan_batch_stats: keep the FAN's BatchNorm on its running averages
      in training too (see the module docstring).

  Returns ``(logits, aux)``; ``aux`` holds ``'stem'`` (the stem map, 256 ch),
  ``'fan_features'`` (the per-stack features before attention), ``'heatmaps'``
  (the last stack's 68 landmark heatmaps), ``'attention'`` (their sum,
  ``[B, H, W]``), ``'stage1'`` ... ``'stageN'`` (after each head block),
  ``'pooled'`` (``[B, 256]`` after AvgPool(4)), ``'embedding'`` (``[B, 128]``,
  the post-BN-ReLU hidden layer that feeds the last FC) and ``'va'``. All FAN
  outputs are under ``stop_gradient``.
  """
  num_classes: int = 8
  num_va: int = 2
  n_stacks: int = 2
  num_head_blocks: int = 4
  freeze_fan_batch_stats: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    if self.num_va not in (0, 2):
      raise ValueError(f"emonet: num_va must be 0 or 2 (valence, arousal), "
                       f"got {self.num_va}")
    x = _check_input(x, self.num_head_blocks)
    fan_train = train and not self.freeze_fan_batch_stats
    stem, fan_features, heatmaps = jax.lax.stop_gradient(
        FaceAlignmentNetwork(self.n_stacks, name="fan")(x, fan_train))

    attention = jnp.sum(heatmaps, axis=-1, keepdims=True)
    y = jnp.concatenate([stem, fan_features * attention], axis=-1)
    y = layers.Conv(HEAD_WIDTH, 1, name="conv1x1_input_emo_2")(y)
    aux = {"stem": stem, "fan_features": fan_features, "heatmaps": heatmaps,
           "attention": attention[..., 0]}
    for i in range(self.num_head_blocks):
      y = layers.max_pool2(ConvBlock(HEAD_WIDTH, name=f"emo_block_{i}")(y, train))
      aux[f"stage{i + 1}"] = y

    # AvgPool(4) then a flatten that needs a 1x1 map (checked on the input).
    pooled = nn.avg_pool(y, (4, 4), strides=(4, 4))[:, 0, 0, :]
    hidden = nn.Dense(EMBEDDING_WIDTH, name="emo_fc_hidden")(pooled)
    hidden = nn.relu(
        BatchNorm(use_running_average=not train, name="emo_fc_bn")(hidden))
    out = nn.Dense(self.num_classes + self.num_va, name="emo_fc_out")(hidden)
    aux["pooled"] = pooled
    aux["embedding"] = hidden
    if self.num_va:
      aux["va"] = out[:, self.num_classes:]
    return out[:, :self.num_classes], aux
