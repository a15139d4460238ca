"""ResNet-18/34/50 and the IR-50 face ResNet.

ResNet: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016 (arXiv:1512.03385), in the torchvision layout: stride on the 3x3
convolution of the bottleneck ("ResNet v1.5"), projection shortcuts (1x1 conv +
BN) only where the shape changes, symmetric padding ``k // 2`` as in PyTorch so
that ported weights give the same outputs.

IR-50: the "improved residual" network of Deng et al., "ArcFace: Additive
Angular Margin Loss for Deep Face Recognition", CVPR 2019 (arXiv:1801.07698),
as ``IR_50`` in face.evoLVe / InsightFace_Pytorch and as loaded by POSTER
(zczcwh/POSTER ``models/ir50.py``) and APViT
(youqingxiaozhua/APViT ``mmcls/models/backbones/irse.py``):
3x3/1 stem conv + BN + PReLU, units BN-conv3x3-PReLU-conv3x3(stride)-BN with a
stride-2 first unit in every stage (112 -> 56 -> 28 -> 14 -> 7), shortcut = a
strided subsample when widths match, else 1x1 conv + BN, and the output layer
BN2d-Dropout-Flatten-FC(512x7x7 -> 512)-BN1d whose output is the embedding.
The ArcFace paper's unit has one more BN after the first conv (as in TFace
and insightface's ``iresnet``); ``mid_bn=True`` selects it, the default follows
the code whose weights POSTER and APViT load.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.base import MODELS

# He-normal on fan-out, torchvision's conv init.
_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
conv_bn = functools.partial(layers.ConvBN, kernel_init=_HE_FAN_OUT)

STEMS = ("imagenet", "small")


def conv(features: int, kernel: int, strides: int = 1,
         name: str | None = None) -> layers.Conv:
  """A bias-free square convolution padded like PyTorch (``kernel // 2``)."""
  return layers.Conv(features, kernel, strides, use_bias=False, kernel_init=_HE_FAN_OUT,
                     name=name)


def projection_shortcut(x, features: int, strides: int, train: bool):
  """Identity when the shape is kept, else a strided 1x1 conv + BN."""
  if x.shape[-1] == features and strides == 1:
    return x
  return conv_bn(features, 1, strides, name="shortcut")(x, train)


class BasicBlock(nn.Module):
  """Two 3x3 convs; the ResNet-18/34 unit."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(conv_bn(self.features, 3, self.strides, name="conv1")(x, train))
    y = conv_bn(self.features, 3, name="conv2")(y, train)
    return nn.relu(
        y + projection_shortcut(x, self.features, self.strides, train))


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4; the ResNet-50 unit."""
  features: int
  strides: int = 1
  expansion: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    y = nn.relu(conv_bn(self.features, 1, name="conv1")(x, train))
    y = nn.relu(conv_bn(self.features, 3, self.strides, name="conv2")(y, train))
    y = conv_bn(out_features, 1, name="conv3")(y, train)
    return nn.relu(
        y + projection_shortcut(x, out_features, self.strides, train))


class IRBlock(nn.Module):
  """Improved residual unit BN-conv-[BN]-PReLU-conv(stride)-BN, no final act."""
  features: int
  strides: int = 1
  mid_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = layers.batch_norm(train, name="bn_in")(x)
    if self.mid_bn:
      y = conv_bn(self.features, 3, name="conv1")(y, train)
    else:
      y = conv(self.features, 3, name="conv1")(y)
    y = layers.ChannelPReLU(name="prelu")(y)
    y = conv_bn(self.features, 3, self.strides, name="conv2")(y, train)
    if x.shape[-1] == self.features:
      # face.evoLVe's MaxPool2d(1, stride): a plain strided subsample.
      shortcut = x[:, ::self.strides, ::self.strides, :]
    else:
      shortcut = projection_shortcut(x, self.features, self.strides, train)
    return y + shortcut


class ResNet(nn.Module):
  """He et al. ResNet with a selectable stem and base width.

  Attributes:
    num_classes: classifier width.
    stage_sizes: units per stage.
    block: ``BasicBlock`` or ``BottleneckBlock``.
    num_va: width of the valence/arousal head (0 = none).
    stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool, for 112-224 px) or
      ``'small'`` (3x3/1 conv, no pool, for 48 px FER2013 images). He et al.
      define only the former; 'small' is the usual CIFAR-style adaptation
      (our reconstruction), which leaves a 6x6 final map at 48 px.
    width: channels of the stem and the first stage; stage i has
      ``width * 2**i`` (times 4 for bottlenecks).
  """
  num_classes: int
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_va: int = 0
  stem: str = "imagenet"
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem not in STEMS:
      raise ValueError(f"ResNet.stem must be one of {STEMS}, got {self.stem!r}")
    if self.stem == "imagenet":
      x = nn.relu(conv_bn(self.width, 7, 2, name="stem")(x, train))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = nn.relu(conv_bn(self.width, 3, name="stem")(x, train))
    aux = {"stem": x}
    for i, num_units in enumerate(self.stage_sizes):
      for j in range(num_units):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(self.width * 2**i, strides,
                       name=f"stage{i + 1}_unit{j + 1}")(x, train)
      aux[f"stage{i + 1}"] = x
    aux["embedding"] = jnp.mean(x, axis=(1, 2))
    logits, extras = layers.Heads(self.num_classes, self.num_va)(
        aux["embedding"], train)
    return logits, {**aux, **extras}


class IResNet(nn.Module):
  """The IR face ResNet (``IR_50`` for ``stage_sizes=(3, 4, 14, 3)``).

  The embedding is the BN1d output of the FC output layer, whose input size
  follows the final map (512x7x7 at 112 px, 512x3x3 at 48 px). The stem is
  fixed (3x3/1 conv + BN + PReLU), so there is no ``stem`` field.

  Attributes:
    num_classes: classifier width (a head on the embedding, not in IR_50).
    stage_sizes: units per stage.
    num_va: width of the valence/arousal head (0 = none).
    width: stem and stage-1 channels; stage i has ``width * 2**i``; the
      embedding has the last stage's width (512 at the default 64).
    mid_bn: add the ArcFace paper's BN between the first conv and the PReLU.
    dropout_rate: dropout of the output layer (``Dropout()`` = 0.5 in
      face.evoLVe / APViT).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 14, 3)
  num_va: int = 0
  width: int = 64
  mid_bn: bool = False
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv_bn(self.width, 3, name="stem")(x, train)
    x = layers.ChannelPReLU(name="stem_prelu")(x)
    aux = {"stem": x}
    for i, num_units in enumerate(self.stage_sizes):
      for j in range(num_units):
        x = IRBlock(self.width * 2**i, 2 if j == 0 else 1, self.mid_bn,
                    name=f"stage{i + 1}_unit{j + 1}")(x, train)
      aux[f"stage{i + 1}"] = x
    y = layers.batch_norm(train, name="output_bn2d")(x)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    # Flatten channel-major like PyTorch so a ported FC weight lines up.
    y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)
    y = nn.Dense(x.shape[-1], name="output_fc")(y)
    aux["embedding"] = layers.batch_norm(train, name="output_bn1d")(y)
    logits, extras = layers.Heads(self.num_classes, self.num_va)(
        aux["embedding"], train)
    return logits, {**aux, **extras}


@MODELS.register("resnet18")
def resnet18(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(2, 2, 2, 2), block=BasicBlock, **kwargs)


@MODELS.register("resnet34")
def resnet34(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(3, 4, 6, 3), block=BasicBlock, **kwargs)


@MODELS.register("resnet50")
def resnet50(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(3, 4, 6, 3), block=BottleneckBlock, **kwargs)


@MODELS.register("ir50")
def ir50(**kwargs) -> IResNet:
  return IResNet(stage_sizes=(3, 4, 14, 3), **kwargs)
