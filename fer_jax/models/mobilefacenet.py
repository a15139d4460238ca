"""MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate
Real-Time Face Verification on Mobile Devices", CCBR 2018, arXiv:1804.07573).

This is the backbone of Table 1 for 112x112 faces. It has 0.99 M parameters
and 221 M MACs up to the 128-d embedding. The layers are conv 3x3 s2 (64) ->
depthwise 3x3 (64) -> bottlenecks (t, c, n, s) = (2, 64, 5, 2), (4, 128, 1, 2),
(2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1) -> conv 1x1 (512) -> linear
global depthwise conv (GDConv) -> linear conv 1x1 (128). Every non-linear layer
is BN + per-channel PReLU. The project conv of a bottleneck and the last two
layers are linear (BN only). For expression recognition a linear classifier
(and the optional valence/arousal head) sits on the 128-d embedding. It adds
``129 * num_classes`` parameters beyond the paper's count.

The GDConv kernel equals the size of the final map (7x7 at 112 px, 3x3 at
48 px). The paper fixes 7x7 because it only uses 112 px input. Sizing the
kernel from the map is our generalisation, so the layer stays a global
weighted pooling at any input size.

``aux`` maps (112 px / 48 px): 'stem' (conv + depthwise) 56/24, 'stage1'
28/12, 'stage2' 14/6, 'stage3' (after the 512-channel conv, the map GDConv
pools) 7/3. 'embedding' is the 128-d linear output.
"""
import flax.linen as nn
import jax

from fer_jax.models import layers
from fer_jax.models.base import MODELS

# (expansion t, output channels c, repeats n, first stride s), Table 1.
BOTTLENECK_SETTINGS = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
# Index into BOTTLENECK_SETTINGS of the group that closes 'stage1' and 'stage2'.
_STAGE_ENDS = {0: "stage1", 2: "stage2"}
STEM_CHANNELS = 64
EXPANDED_CHANNELS = 512
EMBEDDING_DIM = 128


class Bottleneck(nn.Module):
  """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, PReLU activations."""
  features: int
  strides: int
  expansion: int
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    h = layers.ConvBN(in_features * self.expansion, name="expand")(x, train)
    h = layers.ChannelPReLU(name="expand_act")(h)
    h = layers.ConvBN(None, 3, self.strides, depthwise=True,
                      depthwise_impl=self.depthwise_impl, name="depthwise")(h, train)
    h = layers.ChannelPReLU(name="depthwise_act")(h)
    h = layers.ConvBN(self.features, name="project")(h, train)
    if self.strides == 1 and in_features == self.features:
      h = h + x
    return h


class MobileFaceNet(nn.Module):
  """MobileFaceNet classifier returning ``(logits, aux)`` (see models/base.py).

  Attributes:
    num_classes: classifier outputs.
    num_va: valence/arousal outputs (0: none).
    dropout_rate: dropout on the embedding before the heads (the paper has no
      classifier, so none by default).
    depthwise_impl: ``layers.DepthwiseConv.impl``.
  """
  num_classes: int
  num_va: int = 0
  dropout_rate: float = 0.0
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    aux = {}
    h = layers.ConvBN(STEM_CHANNELS, 3, 2, name="stem_conv")(x, train)
    h = layers.ChannelPReLU(name="stem_conv_act")(h)
    h = layers.ConvBN(None, 3, depthwise=True, depthwise_impl=self.depthwise_impl,
                      name="stem_depthwise")(h, train)
    h = aux["stem"] = layers.ChannelPReLU(name="stem_depthwise_act")(h)
    for group, (expansion, channels, repeats, first_stride) in enumerate(BOTTLENECK_SETTINGS):
      for i in range(repeats):
        h = Bottleneck(channels, first_stride if i == 0 else 1, expansion,
                       self.depthwise_impl, name=f"block{group}_{i}")(h, train)
      if group in _STAGE_ENDS:
        aux[_STAGE_ENDS[group]] = h
    h = layers.ConvBN(EXPANDED_CHANNELS, name="expand_conv")(h, train)
    h = aux["stage3"] = layers.ChannelPReLU(name="expand_conv_act")(h)
    h = layers.DepthwiseConv(h.shape[1:3], padding="VALID", use_bias=False,
                             impl=self.depthwise_impl, name="gdconv")(h)
    h = layers.batch_norm(train, name="gdconv_bn")(h)
    h = layers.ConvBN(EMBEDDING_DIM, name="linear_conv")(h, train)
    aux["embedding"] = h.reshape(h.shape[0], -1)
    logits, extras = layers.Heads(self.num_classes, self.num_va, self.dropout_rate,
                                  name="heads")(aux["embedding"], train)
    aux.update(extras)
    return logits, aux


MODELS.register("mobilefacenet")(MobileFaceNet)
