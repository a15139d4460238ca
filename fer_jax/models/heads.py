"""Wrappers that put a head on any registered encoder: the MoCo projection and the linear probe."""
from typing import Any

import flax.linen as nn
import jax

from fer_jax.models.base import MODELS


def _build(name: str, num_classes: int, kwargs) -> nn.Module:
  return MODELS.get(name)(num_classes=num_classes, **dict(kwargs or {}), name="encoder")


@MODELS.register("contrastive")
class ContrastiveEncoder(nn.Module):
  """An encoder with MoCo v2's MLP projection head (Chen et al. 2020).

  ``aux['projection']`` is the L2-normalisable embedding the contrastive terms
  use; the encoder's own aux entries pass through for feature distillation.
  DisCo's wider hidden layer is the ``hidden`` field (2048 in DisCo, 2048 in
  MoCo v2 for ResNet-50; the encoder width for small students).
  """
  num_classes: int
  encoder: str = "resnet18"
  encoder_kwargs: Any = None
  hidden: int = 512
  projection_dim: int = 128
  num_va: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    logits, aux = _build(self.encoder, self.num_classes, self.encoder_kwargs)(x, train=train)
    h = nn.relu(nn.Dense(self.hidden, name="projection_hidden")(aux["embedding"]))
    projection = nn.Dense(self.projection_dim, name="projection_out")(h)
    return logits, {**aux, "projection": projection}


@MODELS.register("linear_probe")
class LinearProbe(nn.Module):
  """A linear classifier on a frozen encoder's pooled embedding.

  The encoder always runs in inference mode (its BatchNorm statistics stay
  fixed) and its output is cut from the gradient; the phase config also
  freezes its parameters (``freeze=('encoder',)``), so only ``head`` trains.
  """
  num_classes: int
  encoder: str = "resnet18"
  encoder_kwargs: Any = None
  num_va: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, aux = _build(self.encoder, self.num_classes, self.encoder_kwargs)(x, train=False)
    embedding = jax.lax.stop_gradient(aux["embedding"])
    logits = nn.Dense(self.num_classes, name="head")(embedding)
    return logits, {"embedding": embedding}
