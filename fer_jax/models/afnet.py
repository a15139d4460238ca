"""AFNet: the attention fusion network teacher for occluded-face FER.

Chen, Li, Tian, Wei, Seberi, "Lightweight expression recognition combined
attention fusion network with hybrid knowledge distillation for occluded
e-learner facial images", Neurocomputing 628 (2025) 129656.

Only the abstract is public. It names three parts on a CNN backbone: a
multi-branch spatial attention network that extracts local facial features and
lowers the weight of occluded regions, a randomly masked channel network for
robustness to occlusion, and a feature pyramid network for global multi-scale
features. Everything more specific than that is a reconstruction from the
nearest public designs (see docs/methods.md, section 1(a)); each choice is a
field so that it can be ablated:

* Local branch (``num_regions`` > 0). ``num_regions`` cross-attention heads of
  DAN (Wen et al., "Distract your attention: multi-head cross attention network
  for facial expression recognition", Biomimetics 2023): each head is a spatial
  attention (1x1 reduction, then 3x3 + 1x3 + 3x1 convs summed over channels
  into one map) followed by a squeeze-excitation channel attention, giving one
  map and one region feature per head. Unlike DAN, each map is normalised to
  sum to 1 over positions, so a region feature is an attention-weighted mean
  of the last map on the same scale as the whole-face mean. RAN's
  self-attention (Wang et al., "Region attention networks for pose and
  occlusion robust facial expression recognition", TIP 2020) scores each
  region with one shared ``mu_k = sigmoid(w^T f_k + b)`` and scores the whole
  face (the pooled last map) with the same ``w`` as ``mu_0``; the local
  feature is RAN's weighted mean
  ``sum_k mu_k f_k / sum_k mu_k``, so a region the model finds unreliable (for
  example occluded) contributes little. RAN's relation attention is left out.
  The regions are learned attention maps rather than RAN's fixed crops: at
  48 px the last map is only 2x2 to 6x6, too coarse to crop an eye band from.
* Region regulariser (``region_loss``). DAN's partition loss, on the heads'
  features after a log-softmax over heads as in DAN's code, pushes the heads
  to attend to different places; RAN's region-biased loss asks that some
  region be weighted above the whole face by ``region_margin``.
* Masked-channel branch (``channel_mask_keep`` < 1). At train time a
  Bernoulli(keep) mask over the channels of the last map, one mask per sample
  shared by all positions and rescaled by 1/keep, then a 1x1 conv, BatchNorm,
  ReLU and pooling; at eval the mask is the identity.
* Global branch. With ``use_fpn`` a top-down FPN over the pyramid stages
  (C3-C5); each level is pooled and the pooled levels are concatenated, so the
  classifier sees the scales apart. Without it, the pooled last map.
* Fusion (``fusion``). Each branch feature is projected linearly to
  ``embed_dim``; the projections are concatenated, summed, or averaged with
  per-sample softmax weights over branches (``'attention'``, scored by a
  shared ``v^T tanh(e_b)``), then dropout and the classifier.

The backbone is any registered model with the pyramid stages in its aux; its
own classifier is built (the contract requires one) but not used, so its
parameters get no gradient.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers
from fer_jax.models.base import MODELS

FUSIONS = ("concat", "sum", "attention")
REGION_LOSSES = ("partition", "region_biased", "none")
PYRAMID_NAMES = ("fpn_p3", "fpn_p4", "fpn_p5")
_EPSILON = 1e-6


def partition_loss(head_features: jax.Array) -> jax.Array:
  """DAN's partition loss ``log(1 + K / var)``; large when the K heads agree.

  Args:
    head_features: ``[B, K, D]``, one feature per head.

  Returns:
    A scalar. The variance is taken over heads (unbiased, as torch's default
    in DAN's code) and averaged over batch and features; a single head gives 0.
  """
  num_heads = head_features.shape[1]
  if num_heads < 2:
    return jnp.zeros((), head_features.dtype)
  variance = jnp.var(head_features, axis=1, ddof=1).mean()
  return jnp.log1p(num_heads / variance)


def region_biased_loss(region_weights: jax.Array, face_weight: jax.Array,
                       margin: float) -> jax.Array:
  """RAN's region-biased loss ``max(0, margin - (max_k mu_k - mu_0))``.

  Args:
    region_weights: ``[B, K]`` importance weights ``mu_k`` of the regions.
    face_weight: ``[B]`` importance weight ``mu_0`` of the whole face.
    margin: the required lead of the best region over the whole face.

  Returns:
    The loss averaged over the batch.
  """
  lead = jnp.max(region_weights, axis=1) - face_weight
  return jnp.mean(jax.nn.relu(margin - lead))


class SpatialAttention(nn.Module):
  """DAN's spatial attention: one non-negative ``[B, H, W]`` map per head."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    reduced = layers.batch_norm(train)(
        layers.Conv(max(channels // 2, 1), 1, use_bias=False)(x))
    # Square, wide and tall kernels respond to blobs and to horizontal and
    # vertical facial structures (brows, mouth, nose).
    responses = [
        layers.batch_norm(train)(
            layers.Conv(channels, kernel, use_bias=False)(reduced))
        for kernel in ((3, 3), (1, 3), (3, 1))
    ]
    return nn.relu(sum(responses)).sum(axis=-1)


class ChannelAttention(nn.Module):
  """DAN's squeeze-excitation gate on a pooled feature ``[B, C]``."""
  reduction: int = 16

  @nn.compact
  def __call__(self, pooled: jax.Array, train: bool) -> jax.Array:
    channels = pooled.shape[-1]
    # No bias: the BatchNorm that follows would cancel it.
    gate = nn.Dense(max(channels // self.reduction, 1), use_bias=False)(pooled)
    gate = nn.relu(layers.batch_norm(train)(gate))
    gate = nn.sigmoid(nn.Dense(channels)(gate))
    return pooled * gate


class RegionAttention(nn.Module):
  """K DAN heads, each a region map and feature, weighted by RAN's ``mu``."""
  num_regions: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    maps, features = [], []
    for k in range(self.num_regions):
      att = SpatialAttention(name=f"spatial{k}")(x, train)
      # DAN pools x * att unnormalised; with att a sum over C channels that
      # makes region features ~C times the whole-face mean and saturates the
      # sigmoid weights. Normalised, a region feature is a weighted mean.
      att = att / (jnp.sum(att, axis=(1, 2), keepdims=True) + _EPSILON)
      pooled = jnp.sum(x * att[..., None], axis=(1, 2))
      maps.append(att)
      features.append(ChannelAttention(name=f"channel{k}")(pooled, train))
    region_features = jnp.stack(features, axis=1)
    importance = nn.Dense(1, name="importance")
    region_weights = nn.sigmoid(importance(region_features))[..., 0]
    face_weight = nn.sigmoid(importance(jnp.mean(x, axis=(1, 2))))[..., 0]
    fused = (jnp.einsum("bk,bkc->bc", region_weights, region_features) /
             jnp.sum(region_weights, axis=1, keepdims=True))
    return {
        "feature": fused,
        "att_map": jnp.stack(maps, axis=-1),
        "region_features": region_features,
        "region_weights": region_weights,
        "face_weight": face_weight,
    }


class FeaturePyramid(nn.Module):
  """Top-down FPN (Lin et al., CVPR 2017): 1x1 laterals, upsample+add, 3x3."""
  features: int

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
    """Maps fine to coarse in, pyramid levels fine to coarse out."""
    laterals = [
        layers.Conv(self.features, 1, name=f"lateral{i}")(m)
        for i, m in enumerate(maps)
    ]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
      # Resizing to the exact shape also covers odd sizes (3x3 above 6x6).
      upsampled = jax.image.resize(merged[0], lateral.shape, "nearest")
      merged.insert(0, lateral + upsampled)
    return [
        layers.Conv(self.features, 3, name=f"output{i}")(m)
        for i, m in enumerate(merged)
    ]


class MaskedChannels(nn.Module):
  """The randomly masked channel branch on the last map; pooled ``[B, C]``."""
  keep: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # Dropout broadcast over H and W draws one Bernoulli(keep) mask per sample
    # and channel, rescaled by 1/keep, from the 'dropout' stream.
    masked = nn.Dropout(
        1.0 - self.keep, broadcast_dims=(1, 2), deterministic=not train,
        name="mask")(x)
    mixed = layers.Conv(x.shape[-1], 1, use_bias=False)(masked)
    return jnp.mean(nn.relu(layers.batch_norm(train)(mixed)), axis=(1, 2))


class BranchFusion(nn.Module):
  """Fuses named branch features ``[B, D_b]`` into one embedding."""
  mode: str
  features: int

  @nn.compact
  def __call__(self, branches: Mapping[str, jax.Array], train: bool) -> jax.Array:
    # Each projection is BatchNorm + ReLU, like a backbone's pooled features:
    # the FPN and region features are not normalised, and raw linear
    # projections of them made SGD at the usual rates (0.05-0.1) diverge.
    projected = [
        nn.relu(layers.batch_norm(train, name=f"norm_{name}")(
            nn.Dense(self.features, use_bias=False, name=f"project_{name}")(feature)))
        for name, feature in branches.items()
    ]
    if self.mode == "concat":
      return jnp.concatenate(projected, axis=-1)
    stacked = jnp.stack(projected, axis=1)
    if self.mode == "sum":
      return jnp.sum(stacked, axis=1)
    scores = nn.Dense(1, use_bias=False, name="score")(jnp.tanh(stacked))
    weights = nn.softmax(scores[..., 0], axis=1)
    return jnp.einsum("bn,bnd->bd", weights, stacked)


@MODELS.register("afnet")
class AFNet(nn.Module):
  """AFNet teacher: backbone + FPN, region attention and masked channels.

  Attributes:
    num_classes: expression classes.
    num_va: valence/arousal outputs (0 for none).
    backbone: registered model name of the backbone.
    backbone_kwargs: extra backbone fields, pairs or a mapping (for example
      ``(('stem', 'small'), ('width', 64))``).
    pyramid_stages: backbone aux maps used as C3, C4, C5, fine to coarse; the
      last one feeds the region and masked-channel branches.
    use_fpn: global branch from the FPN (else the pooled last map).
    fpn_dim: FPN channels.
    num_regions: region attention heads; 0 disables the local branch.
    region_loss: ``'partition'``, ``'region_biased'`` or ``'none'``; exposed as
      ``aux['region_loss']``.
    region_margin: RAN's margin ``alpha`` of the region-biased loss (0.02 is
      RAN's value as recalled, not checked against the paper).
    channel_mask_keep: keep probability of the channel mask; 1.0 disables the
      masked-channel branch.
    fusion: ``'concat'``, ``'sum'`` or ``'attention'``.
    embed_dim: width of each projected branch feature.
    dropout_rate: dropout before the classifier (own choice; the paper's value
      is not public).

  ``aux`` holds the backbone's 'stem' and stage maps, 'fpn_p3'..'fpn_p5'
  (with ``use_fpn``), 'att_map' ``[B, H, W, K]`` (each head's map, summing to
  1 over positions), 'region_weights' ``[B, K]`` (``mu_k``) and 'region_loss'
  (with regions and a region loss), 'embedding' (the fused feature) and 'va'
  (with ``num_va``).
  """
  num_classes: int
  num_va: int = 0
  backbone: str = "resnet18"
  backbone_kwargs: Any = ()
  pyramid_stages: tuple[str, ...] = ("stage2", "stage3", "stage4")
  use_fpn: bool = True
  fpn_dim: int = 128
  num_regions: int = 4
  region_loss: str = "partition"
  region_margin: float = 0.02
  channel_mask_keep: float = 0.8
  fusion: str = "concat"
  embed_dim: int = 256
  dropout_rate: float = 0.4

  def __post_init__(self):
    if self.fusion not in FUSIONS:
      raise ValueError(
          f"AFNet.fusion must be one of {FUSIONS}, got {self.fusion!r}")
    if self.region_loss not in REGION_LOSSES:
      raise ValueError(f"AFNet.region_loss must be one of {REGION_LOSSES}, "
                       f"got {self.region_loss!r}")
    if self.num_regions < 0:
      raise ValueError(
          f"AFNet.num_regions must be >= 0, got {self.num_regions}")
    if not 0.0 < self.channel_mask_keep <= 1.0:
      raise ValueError("AFNet.channel_mask_keep must be in (0, 1], got "
                       f"{self.channel_mask_keep}")
    if len(self.pyramid_stages) != len(PYRAMID_NAMES):
      raise ValueError(f"AFNet.pyramid_stages must name {len(PYRAMID_NAMES)} "
                       f"backbone maps (C3-C5), got {self.pyramid_stages}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"AFNet expects an NHWC batch, got shape {x.shape}")
    backbone = MODELS.get(self.backbone)(
        num_classes=self.num_classes, name="backbone",
        **dict(self.backbone_kwargs))
    _, backbone_aux = backbone(x, train=train)
    missing = [s for s in self.pyramid_stages if s not in backbone_aux]
    if missing:
      raise ValueError(
          f"AFNet.pyramid_stages: backbone {self.backbone!r} has no aux maps "
          f"{missing}; it has {sorted(backbone_aux)}")
    aux = {k: v for k, v in backbone_aux.items()
           if k == "stem" or k.startswith("stage")}
    last = backbone_aux[self.pyramid_stages[-1]]

    branches = {}
    if self.use_fpn:
      pyramid = FeaturePyramid(self.fpn_dim, name="fpn")(
          [backbone_aux[s] for s in self.pyramid_stages])
      aux.update(zip(PYRAMID_NAMES, pyramid))
      branches["global"] = jnp.concatenate(
          [jnp.mean(p, axis=(1, 2)) for p in pyramid], axis=-1)
    else:
      branches["global"] = jnp.mean(last, axis=(1, 2))

    if self.num_regions:
      regions = RegionAttention(self.num_regions, name="regions")(last, train)
      branches["local"] = regions["feature"]
      aux["att_map"] = regions["att_map"]
      aux["region_weights"] = regions["region_weights"]
      if self.region_loss == "partition":
        aux["region_loss"] = partition_loss(
            jax.nn.log_softmax(regions["region_features"], axis=1))
      elif self.region_loss == "region_biased":
        aux["region_loss"] = region_biased_loss(
            regions["region_weights"], regions["face_weight"],
            self.region_margin)

    if self.channel_mask_keep < 1.0:
      branches["masked"] = MaskedChannels(
          self.channel_mask_keep, name="masked_channels")(last, train)

    embedding = BranchFusion(self.fusion, self.embed_dim, name="fusion")(
        branches, train)
    logits, extras = layers.Heads(
        self.num_classes, self.num_va, self.dropout_rate, name="heads")(
            embedding, train)
    return logits, {**aux, "embedding": embedding, **extras}
