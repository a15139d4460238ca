"""EfficientFormer (Li et al., "EfficientFormer: Vision Transformers at
MobileNet Speed", NeurIPS 2022, arXiv:2206.01191).

The layout follows the authors' code (snap-research/EfficientFormer) as
restructured in timm's ``efficientformer.py``:

  * stem: two conv 3x3 stride-2 + BN + ReLU (C/2, then C channels);
  * stages 1-4: 4D MetaBlocks, i.e. x + ls * (avgpool3x3(x) - x), then
    x + ls * BN(conv1x1(GELU(BN(conv1x1(x))))). Stages 2-4 open with a conv
    3x3 stride-2 + BN downsample;
  * the last ``num_vit`` blocks of stage 4 are 3D MetaBlocks on flattened
    tokens: x + ls * MHSA(LN(x)), then x + ls * MLP(LN(x)). Attention uses 8
    heads, key dim 32, value dim 128, and a learned bias per head for each
    relative offset (|dy|, |dx|);
  * LayerNorm, token mean, linear classifier.

Variants: L1 has depths (3, 2, 6, 4), widths (48, 96, 224, 448) and 1 attention
block. L3 has (4, 4, 12, 6), (64, 128, 320, 512) and 4 attention blocks.

Changes from the reference, each a deliberate choice:

  * One classifier head. The reference also has a distillation head
    (``head_dist``) for DeiT-style hard distillation from a RegNetY teacher,
    and averages the two heads at inference. Here distillation is the
    trainer's job, so that head is not built. The published sizes count it:
    12.3 M (L1) and 31.4 M (L3) at 1000 classes are this model's parameters
    plus ``(D + 1) * 1000`` (0.45 M / 0.51 M). Its MACs (< 0.001 G) do not
    change the quoted 1.3 / 3.9 GMACs.
  * The attention-bias table is sized from the actual final feature map
    (7x7 at 224 px, 4x4 at 112 px, 6x6 at 48 px with the 'small' stem), not
    fixed at 7x7. A checkpoint therefore only loads at the resolution it was
    trained at.
  * ``stem='small'`` (our reconstruction for 48 px faces; the paper has no
    such variant) makes both stem convs stride 1. The total stride drops from
    32 to 8, as with MobileNetV2's 'small' stem, so 48 px ends at 6x6.

``aux`` maps (224 px / 112 px / 48 px 'small'): 'stem' 56/28/48,
'stage1' 56/28/48, 'stage2' 28/14/24, 'stage3' 14/7/12, 'stage4' 7/4/6.
'stage4' is the LayerNorm-ed final map (tokens reshaped to NHWC) that is
mean-pooled into 'embedding'.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fer_jax.models import layers
from fer_jax.models.base import MODELS

# variant -> (depths, widths, attention blocks at the end of stage 4)
VARIANTS = {
    "l1": ((3, 2, 6, 4), (48, 96, 224, 448), 1),
    "l3": ((4, 4, 12, 6), (64, 128, 320, 512), 4),
}
STEMS = ("imagenet", "small")
LN_EPSILON = 1e-5  # torch.nn.LayerNorm's default; Flax's is 1e-6.

_DENSE_INIT = nn.initializers.truncated_normal(0.02)


def _gelu(x: jax.Array) -> jax.Array:
  # The reference uses torch.nn.GELU, the exact erf form.
  return jax.nn.gelu(x, approximate=False)


def relative_position_index(height: int, width: int) -> np.ndarray:
  """``[N, N]`` index into a ``height * width`` bias table for N = H*W tokens.

  Tokens p and q map to |dy| * width + |dx|, as in the reference.
  """
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  return np.abs(ys[:, None] - ys[None, :]) * width + np.abs(xs[:, None] - xs[None, :])


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch, initialised small."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale


class Attention(nn.Module):
  """Multi-head self-attention with relative-position biases over a HxW grid.

  The fused qkv projection is laid out per head as [q | k | v], the
  reference's order, so converted weights line up.
  """
  spatial: tuple[int, int]
  num_heads: int = 8
  key_dim: int = 32
  attn_ratio: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    batch, num_tokens, dim = tokens.shape
    height, width = self.spatial
    value_dim = self.attn_ratio * self.key_dim
    qkv = nn.Dense(self.num_heads * (2 * self.key_dim + value_dim), kernel_init=_DENSE_INIT,
                   name="qkv")(tokens)
    qkv = qkv.reshape(batch, num_tokens, self.num_heads, -1)
    q, k, v = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.key_dim**-0.5
    bias_table = self.param("attention_biases", nn.initializers.zeros_init(),
                            (self.num_heads, height * width))
    logits = logits + bias_table[:, relative_position_index(height, width)]
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, num_tokens, -1)
    return nn.Dense(dim, kernel_init=_DENSE_INIT, name="proj")(out)


class MetaBlock4D(nn.Module):
  """Pooling token mixer and a conv MLP with BatchNorm, on NHWC maps."""
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dim = x.shape[-1]
    # Padding excluded from the mean, so borders are not pulled toward zero.
    pooled = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                         count_include_pad=False)
    drop_path = layers.DropPath(self.drop_path_rate)
    x = x + drop_path(LayerScale(name="ls1")(pooled - x), train)
    h = layers.ConvBN(dim * self.mlp_ratio, use_bias=True, name="fc1")(x, train)
    h = layers.ConvBN(dim, use_bias=True, name="fc2")(_gelu(h), train)
    return x + drop_path(LayerScale(name="ls2")(h), train)


class MetaBlock3D(nn.Module):
  """Pre-LN transformer block (attention, then a linear MLP) on tokens."""
  spatial: tuple[int, int]
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
    dim = tokens.shape[-1]
    drop_path = layers.DropPath(self.drop_path_rate)
    h = nn.LayerNorm(LN_EPSILON, name="norm1")(tokens)
    tokens = tokens + drop_path(LayerScale(name="ls1")(Attention(self.spatial, name="attn")(h)),
                                train)
    h = nn.LayerNorm(LN_EPSILON, name="norm2")(tokens)
    h = nn.Dense(dim * self.mlp_ratio, kernel_init=_DENSE_INIT, name="fc1")(h)
    h = nn.Dense(dim, kernel_init=_DENSE_INIT, name="fc2")(_gelu(h))
    return tokens + drop_path(LayerScale(name="ls2")(h), train)


class EfficientFormer(nn.Module):
  """EfficientFormer classifier returning ``(logits, aux)`` (see models/base.py).

  Attributes:
    num_classes: classifier outputs.
    num_va: valence/arousal outputs (0: none).
    variant: 'l1' or 'l3'.
    stem: 'imagenet' (stride 4) or 'small' (stride 1, for 48 px faces).
    drop_path_rate: stochastic depth, rising linearly over blocks to this rate
      (reference default 0).
    dropout_rate: dropout on the embedding before the heads (reference 0).
  """
  num_classes: int
  num_va: int = 0
  variant: str = "l1"
  stem: str = "imagenet"
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    if self.variant not in VARIANTS:
      raise ValueError(
          f"EfficientFormer.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
    if self.stem not in STEMS:
      raise ValueError(f"EfficientFormer.stem must be one of {STEMS}, got {self.stem!r}")
    depths, widths, num_vit = VARIANTS[self.variant]
    stem_stride = 1 if self.stem == "small" else 2
    aux = {}
    h = layers.ConvBN(widths[0] // 2, 3, stem_stride, use_bias=True, name="stem1")(x, train)
    h = layers.ConvBN(widths[0], 3, stem_stride, use_bias=True, name="stem2")(
        jax.nn.relu(h), train)
    h = aux["stem"] = jax.nn.relu(h)
    drop_rates = iter(np.linspace(0.0, self.drop_path_rate, sum(depths)))
    for stage, (depth, width) in enumerate(zip(depths, widths), start=1):
      if stage > 1:
        h = layers.ConvBN(width, 3, 2, use_bias=True, name=f"downsample{stage}")(h, train)
      vit_start = depth - num_vit if stage == len(depths) else depth
      for i in range(vit_start):
        h = MetaBlock4D(drop_path_rate=float(next(drop_rates)),
                        name=f"stage{stage}_block{i}")(h, train)
      if vit_start < depth:
        batch, height, width_px, channels = h.shape
        h = h.reshape(batch, height * width_px, channels)
        for i in range(vit_start, depth):
          h = MetaBlock3D((height, width_px), drop_path_rate=float(next(drop_rates)),
                          name=f"stage{stage}_block{i}")(h, train)
        h = h.reshape(batch, height, width_px, channels)
      aux[f"stage{stage}"] = h
    h = aux[f"stage{len(depths)}"] = nn.LayerNorm(LN_EPSILON, name="norm")(h)
    aux["embedding"] = jnp.mean(h, axis=(1, 2))
    logits, extras = layers.Heads(self.num_classes, self.num_va, self.dropout_rate,
                                  _DENSE_INIT, name="heads")(aux["embedding"], train)
    aux.update(extras)
    return logits, aux


MODELS.register("efficientformer_l1")(functools.partial(EfficientFormer, variant="l1"))
MODELS.register("efficientformer_l3")(functools.partial(EfficientFormer, variant="l3"))
