"""The FER2013 VGG variant of Khaireddin & Chen 2021.

Y. Khaireddin, Z. Chen, "Facial Emotion Recognition: State of the Art
Performance on FER2013", arXiv:2105.03588 (73.28 % on FER2013, single network);
layout from the authors' code, usef-kh/fer ``models/vgg.py`` (class ``Vgg``):

  * four stages of [3x3 conv (with bias) - BN - ReLU] x 2 then 2x2/2 max-pool,
    64-128-256-512 channels;
  * flatten, FC 4096 - dropout - ReLU, FC 4096 - dropout - ReLU, FC classes.

The first FC takes the flattened final map, 512x2x2 = 2048 for the 40x40
ten-crops of the 48x48 images the authors train and test on; other input sizes
change only that layer's input width (4608 at 48x48). Dropout is 0.2: the
class default, which ``utils/setup_network.py`` uses (it builds ``Vgg()``
without passing the unused ``hps['drop']``).
"""
import flax.linen as nn
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.base import MODELS


class VGGFer(nn.Module):
  """VGG variant for FER2013.

  ``aux``: 'stage1'..'stage4' (each stage's map after its max-pool, so
  'stage4' is the map that is flattened), 'embedding' (the second hidden FC
  layer after ReLU, the classifier's input) and 'va' when ``num_va > 0`` (a
  Dense head beside the classifier, not in the paper).

  Attributes:
    num_classes: classifier width.
    num_va: width of the valence/arousal head (0 = none), on the embedding.
    width: channels of stage 1; stage i has ``width * 2**i``.
    fc_width: width of the two hidden FC layers; 0 replaces the flatten and
      both hidden layers by global average pooling, the CPU tier's 48 px net
      (widths 32-64-128-256: 1.17 M parameters, 117 MMACs), the same net the
      2-core PyTorch anchor of the CPU recipes trains.
    dropout_rate: dropout after each hidden FC layer (before the classifier
      when ``fc_width`` is 0).
  """
  num_classes: int
  num_va: int = 0
  width: int = 64
  fc_width: int = 4096
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    aux = {}
    for i in range(4):
      for j in range(2):
        x = nn.relu(layers.ConvBN(self.width * 2**i, 3, use_bias=True,
                                  name=f"stage{i + 1}_conv{j + 1}")(x, train))
      x = layers.max_pool2(x)
      aux[f"stage{i + 1}"] = x
    if not self.fc_width:
      h = jnp.mean(x, axis=(1, 2))
      aux["embedding"] = h
      logits, extras = layers.Heads(self.num_classes, self.num_va, self.dropout_rate)(h, train)
      return logits, {**aux, **extras}
    # Flatten channel-major like PyTorch so ported FC weights line up.
    h = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for k in range(2):
      h = nn.Dense(self.fc_width, name=f"fc{k + 1}")(h)
      h = nn.relu(nn.Dropout(self.dropout_rate, deterministic=not train)(h))
    aux["embedding"] = h
    logits, extras = layers.Heads(self.num_classes, self.num_va)(h, train)
    return logits, {**aux, **extras}


@MODELS.register("vgg_fer")
def vgg_fer(**kwargs) -> VGGFer:
  return VGGFer(**kwargs)
