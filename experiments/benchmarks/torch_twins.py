"""Hand-written PyTorch twins of fer_jax models, for speed comparisons and
output checks.

Each twin is the same architecture as the fer_jax model of the same name. It
uses the same PyTorch-style padding and BatchNorm/LayerNorm epsilons, and its
submodule names mirror the Flax module paths (``stem.conv``,
``block1_0.depthwise.bn``, ``stage4_block3.attn.qkv`` ...). That makes
``load_flax_variables`` a mechanical copy, which the tests use to check
that both frameworks compute the same function. torchvision and timm are not
needed. Twins take NCHW input and return logits only. The models that
distillation reads (VGGFer, AFNet) also have ``forward_aux(x) -> (logits,
aux)``, aux holding the Flax model's maps (NCHW); ``MultiLayerKD``,
``hinton_kd`` and the other loss-term twins mirror ``fer_jax.objectives`` and
``fer_jax.losses`` for the train-step benchmark (train_vs_torch.py).

``TWINS`` maps a registered model name to a constructor
``(num_classes, in_channels, stem, input_size, **fields) -> torch.nn.Module``.
A new benchmark row is one more entry.
"""
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# fer_jax.models.mobilenet_v2 / mobilefacenet / efficientformer tables, repeated so
# the twins do not import JAX.
_MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_MOBILEFACENET_SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2),
                           (2, 128, 2, 1))
_EFFICIENTFORMER_VARIANTS = {
    "l1": ((3, 2, 6, 4), (48, 96, 224, 448), 1),
    "l3": ((4, 4, 12, 6), (64, 128, 320, 512), 4),
}


def _make_divisible(value: float, divisor: int = 8) -> int:
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBN(nn.Sequential):
  """conv (dense or depthwise, padding k//2 unless valid) -> BatchNorm2d."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1,
               depthwise: bool = False, bias: bool = False, valid: bool = False):
    super().__init__()
    self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, 0 if valid else kernel_size // 2,
                          groups=in_ch if depthwise else 1, bias=bias)
    self.bn = nn.BatchNorm2d(out_ch)


class Heads(nn.Module):

  def __init__(self, dim: int, num_classes: int, dropout_rate: float = 0.0):
    super().__init__()
    self.dropout = nn.Dropout(dropout_rate)
    self.classifier = nn.Linear(dim, num_classes)

  def forward(self, x):
    return self.classifier(self.dropout(x))


# --- MobileNetV2 -------------------------------------------------------------


class InvertedResidual(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
    super().__init__()
    hidden = in_ch * expansion
    self.expand = ConvBN(in_ch, hidden) if expansion != 1 else None
    self.depthwise = ConvBN(hidden, hidden, 3, stride, depthwise=True)
    self.project = ConvBN(hidden, out_ch)
    self.residual = stride == 1 and in_ch == out_ch

  def forward(self, x):
    h = F.relu6(self.expand(x)) if self.expand is not None else x
    h = self.project(F.relu6(self.depthwise(h)))
    return x + h if self.residual else h


class MobileNetV2(nn.Module):

  def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "imagenet",
               width: float = 1.0, dropout_rate: float = 0.2):
    super().__init__()
    small = stem == "small"
    channels = _make_divisible(32 * width)
    self.stem = ConvBN(in_channels, channels, 3, 1 if small else 2)
    for group, (expansion, out, repeats, stride) in enumerate(_MOBILENET_V2_SETTINGS):
      out = _make_divisible(out * width)
      stride = 1 if small and group == 1 else stride
      for i in range(repeats):
        self.add_module(f"block{group}_{i}",
                        InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
        channels = out
    last = _make_divisible(1280 * max(1.0, width))
    self.head_conv = ConvBN(channels, last)
    self.heads = Heads(last, num_classes, dropout_rate)

  def forward(self, x):
    for name, module in self.named_children():
      if name == "heads":
        break
      x = module(x)
      if name in ("stem", "head_conv"):
        x = F.relu6(x)
    return self.heads(x.mean((2, 3)))


# --- EfficientFormer ---------------------------------------------------------


class LayerScale(nn.Module):

  def __init__(self, dim: int, init_value: float = 1e-5):
    super().__init__()
    self.scale = nn.Parameter(torch.full((dim,), init_value))

  def forward(self, x):  # channels last
    return x * self.scale


class MetaBlock4D(nn.Module):

  def __init__(self, dim: int, mlp_ratio: int = 4):
    super().__init__()
    self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    self.ls1 = LayerScale(dim)
    self.fc1 = ConvBN(dim, dim * mlp_ratio, bias=True)
    self.fc2 = ConvBN(dim * mlp_ratio, dim, bias=True)
    self.ls2 = LayerScale(dim)

  def forward(self, x):
    x = x + self.ls1((self.pool(x) - x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    h = self.fc2(F.gelu(self.fc1(x)))
    return x + self.ls2(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):

  def __init__(self, dim: int, spatial: tuple[int, int], num_heads: int = 8,
               key_dim: int = 32, attn_ratio: int = 4):
    super().__init__()
    self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, attn_ratio * key_dim
    self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.value_dim))
    self.proj = nn.Linear(num_heads * self.value_dim, dim)
    height, width = spatial
    self.attention_biases = nn.Parameter(torch.zeros(num_heads, height * width))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :]).abs() * width + (xs[:, None] - xs[None, :]).abs()
    self.register_buffer("bias_index", index, persistent=False)

  def forward(self, x):
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
    q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
    attn = (q @ k.transpose(-2, -1)) * self.key_dim**-0.5 + self.attention_biases[:, self.bias_index]
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return self.proj(out)


class MetaBlock3D(nn.Module):

  def __init__(self, dim: int, spatial: tuple[int, int], mlp_ratio: int = 4):
    super().__init__()
    # Registration order is timm 1.0's MetaBlock1d's, for load_reference_state_dict.
    self.norm1 = nn.LayerNorm(dim)
    self.attn = Attention(dim, spatial)
    self.ls1 = LayerScale(dim)
    self.norm2 = nn.LayerNorm(dim)
    self.fc1 = nn.Linear(dim, dim * mlp_ratio)
    self.fc2 = nn.Linear(dim * mlp_ratio, dim)
    self.ls2 = LayerScale(dim)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class EfficientFormer(nn.Module):
  """The attention-bias table is sized for ``input_size`` (square input)."""

  def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "imagenet",
               variant: str = "l1", input_size: int = 224):
    super().__init__()
    depths, widths, num_vit = _EFFICIENTFORMER_VARIANTS[variant]
    stride = 1 if stem == "small" else 2
    self.stem1 = ConvBN(in_channels, widths[0] // 2, 3, stride, bias=True)
    self.stem2 = ConvBN(widths[0] // 2, widths[0], 3, stride, bias=True)
    size = (input_size - 1) // stride + 1
    size = (size - 1) // stride + 1
    self.num_4d = []
    for stage, (depth, width) in enumerate(zip(depths, widths), start=1):
      if stage > 1:
        self.add_module(f"downsample{stage}", ConvBN(widths[stage - 2], width, 3, 2, bias=True))
        size = (size - 1) // 2 + 1
      vit_start = depth - num_vit if stage == len(depths) else depth
      for i in range(depth):
        block = (MetaBlock4D(width) if i < vit_start else
                 MetaBlock3D(width, (size, size)))
        self.add_module(f"stage{stage}_block{i}", block)
    self.norm = nn.LayerNorm(widths[-1])
    self.heads = Heads(widths[-1], num_classes)

  def forward(self, x):
    x = F.relu(self.stem2(F.relu(self.stem1(x))))
    for name, module in self.named_children():
      if name.startswith(("downsample", "stage")):
        if isinstance(module, MetaBlock3D) and x.ndim == 4:
          x = x.flatten(2).transpose(1, 2)
        x = module(x)
    if x.ndim == 4:
      x = x.flatten(2).transpose(1, 2)
    return self.heads(self.norm(x).mean(1))


# --- MobileFaceNet -----------------------------------------------------------


class Bottleneck(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
    super().__init__()
    hidden = in_ch * expansion
    self.expand = ConvBN(in_ch, hidden)
    self.expand_act = nn.PReLU(hidden, 0.25)
    self.depthwise = ConvBN(hidden, hidden, 3, stride, depthwise=True)
    self.depthwise_act = nn.PReLU(hidden, 0.25)
    self.project = ConvBN(hidden, out_ch)
    self.residual = stride == 1 and in_ch == out_ch

  def forward(self, x):
    h = self.project(self.depthwise_act(self.depthwise(self.expand_act(self.expand(x)))))
    return x + h if self.residual else h


class MobileFaceNet(nn.Module):
  """The global depthwise conv's kernel is sized for ``input_size``."""

  def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "imagenet",
               input_size: int = 112):
    super().__init__()
    if stem != "imagenet":
      raise ValueError("MobileFaceNet has a single stem")
    self.stem_conv = ConvBN(in_channels, 64, 3, 2)
    self.stem_conv_act = nn.PReLU(64, 0.25)
    self.stem_depthwise = ConvBN(64, 64, 3, depthwise=True)
    self.stem_depthwise_act = nn.PReLU(64, 0.25)
    channels, size = 64, (input_size - 1) // 2 + 1
    for group, (expansion, out, repeats, stride) in enumerate(_MOBILEFACENET_SETTINGS):
      for i in range(repeats):
        self.add_module(f"block{group}_{i}",
                        Bottleneck(channels, out, stride if i == 0 else 1, expansion))
        channels = out
      size = (size - 1) // stride + 1
    self.expand_conv = ConvBN(channels, 512)
    self.expand_conv_act = nn.PReLU(512, 0.25)
    self.gdconv = nn.Conv2d(512, 512, size, groups=512, bias=False)
    self.gdconv_bn = nn.BatchNorm2d(512)
    self.linear_conv = ConvBN(512, 128)
    self.heads = Heads(128, num_classes)

  def forward(self, x):
    for name, module in self.named_children():
      if name == "heads":
        break
      x = module(x)
    return self.heads(x.flatten(1))


# --- VGGFer and AFNet --------------------------------------------------------
# The models with aux maps: ``features(x)`` gives the Flax model's aux (NCHW maps)
# and ``forward_aux(x)`` its ``(logits, aux)``, which distillation reads.


class VGGFer(nn.Module):
  """fer_jax.models.vgg.VGGFer; ``fc_width=0`` is the CPU tier's pooled net."""

  def __init__(self, num_classes: int, in_channels: int = 1, width: int = 64,
               fc_width: int = 4096, dropout_rate: float = 0.2, input_size: int = 48):
    super().__init__()
    channels = in_channels
    for i in range(4):
      for j in range(2):
        self.add_module(f"stage{i + 1}_conv{j + 1}",
                        ConvBN(channels, width * 2**i, 3, bias=True))
        channels = width * 2**i
    self.fc_width = fc_width
    self.dropout = nn.Dropout(dropout_rate)
    if fc_width:
      side = input_size // 16
      self.fc1 = nn.Linear(channels * side * side, fc_width)
      self.fc2 = nn.Linear(fc_width, fc_width)
      channels = fc_width
    # 'Heads_0': Flax's auto-name of the unnamed layers.Heads. Its dropout is the
    # model's only without the FC layers (they have their own).
    self.add_module("Heads_0", Heads(channels, num_classes, 0.0 if fc_width else dropout_rate))

  def features(self, x) -> dict:
    aux = {}
    for i in range(4):
      for j in range(2):
        x = F.relu(getattr(self, f"stage{i + 1}_conv{j + 1}")(x))
      x = F.max_pool2d(x, 2)
      aux[f"stage{i + 1}"] = x
    if self.fc_width:
      h = x.flatten(1)  # channel-major, as the Flax model flattens
      for fc in (self.fc1, self.fc2):
        h = F.relu(self.dropout(fc(h)))
    else:
      h = x.mean((2, 3))
    aux["embedding"] = h
    return aux

  def forward_aux(self, x):
    aux = self.features(x)
    return self.Heads_0(aux["embedding"]), aux

  def forward(self, x):
    return self.forward_aux(x)[0]


def partition_loss(head_features):
  """fer_jax.models.afnet.partition_loss on ``[B, K, D]``."""
  num_heads = head_features.shape[1]
  if num_heads < 2:
    return head_features.new_zeros(())
  return torch.log1p(num_heads / head_features.var(1, unbiased=True).mean())


class SpatialAttention(nn.Module):
  """DAN's spatial attention: 1x1 reduction, then 3x3 + 1x3 + 3x1 summed; ``[B, H, W]``."""

  def __init__(self, channels: int):
    super().__init__()
    reduced = max(channels // 2, 1)
    self.Conv_0 = nn.Conv2d(channels, reduced, 1, bias=False)  # pylint: disable=invalid-name
    self.BatchNorm_0 = nn.BatchNorm2d(reduced)  # pylint: disable=invalid-name
    for i, (kh, kw) in enumerate(((3, 3), (1, 3), (3, 1)), start=1):
      self.add_module(f"Conv_{i}", nn.Conv2d(reduced, channels, (kh, kw),
                                             padding=(kh // 2, kw // 2), bias=False))
      self.add_module(f"BatchNorm_{i}", nn.BatchNorm2d(channels))

  def forward(self, x):
    reduced = self.BatchNorm_0(self.Conv_0(x))
    responses = sum(getattr(self, f"BatchNorm_{i}")(getattr(self, f"Conv_{i}")(reduced))
                    for i in (1, 2, 3))
    return F.relu(responses).sum(1)


class ChannelAttention(nn.Module):
  """DAN's squeeze-excitation gate on a pooled ``[B, C]`` feature."""

  def __init__(self, channels: int, reduction: int = 16):
    super().__init__()
    hidden = max(channels // reduction, 1)
    self.Dense_0 = nn.Linear(channels, hidden, bias=False)  # pylint: disable=invalid-name
    self.BatchNorm_0 = nn.BatchNorm1d(hidden)  # pylint: disable=invalid-name
    self.Dense_1 = nn.Linear(hidden, channels)  # pylint: disable=invalid-name

  def forward(self, pooled):
    gate = F.relu(self.BatchNorm_0(self.Dense_0(pooled)))
    return pooled * torch.sigmoid(self.Dense_1(gate))


class RegionAttention(nn.Module):
  """K DAN heads (normalised maps, channel gates) weighted by RAN's ``mu``."""

  def __init__(self, channels: int, num_regions: int):
    super().__init__()
    self.num_regions = num_regions
    for k in range(num_regions):
      self.add_module(f"spatial{k}", SpatialAttention(channels))
      self.add_module(f"channel{k}", ChannelAttention(channels))
    self.importance = nn.Linear(channels, 1)

  def forward(self, x) -> dict:
    maps, features = [], []
    for k in range(self.num_regions):
      att = getattr(self, f"spatial{k}")(x)
      att = att / (att.sum((1, 2), keepdim=True) + 1e-6)
      maps.append(att)
      features.append(getattr(self, f"channel{k}")((x * att[:, None]).sum((2, 3))))
    region_features = torch.stack(features, 1)
    weights = torch.sigmoid(self.importance(region_features))[..., 0]
    fused = torch.einsum("bk,bkc->bc", weights, region_features) / weights.sum(1, keepdim=True)
    return {"feature": fused, "att_map": torch.stack(maps, -1),
            "region_features": region_features, "region_weights": weights,
            "face_weight": torch.sigmoid(self.importance(x.mean((2, 3))))[:, 0]}


class FeaturePyramid(nn.Module):
  """Top-down FPN: 1x1 laterals, nearest upsample + add, 3x3 outputs (fine to coarse)."""

  def __init__(self, in_channels: tuple[int, ...], features: int):
    super().__init__()
    for i, channels in enumerate(in_channels):
      self.add_module(f"lateral{i}", nn.Conv2d(channels, features, 1))
    for i in range(len(in_channels)):
      self.add_module(f"output{i}", nn.Conv2d(features, features, 3, padding=1))
    self.levels = len(in_channels)

  def forward(self, maps):
    laterals = [getattr(self, f"lateral{i}")(m) for i, m in enumerate(maps)]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
      # 'nearest-exact' is jax.image.resize's 'nearest' (half-pixel centres).
      merged.insert(0, lateral + F.interpolate(merged[0], size=lateral.shape[2:],
                                               mode="nearest-exact"))
    return [getattr(self, f"output{i}")(m) for i, m in enumerate(merged)]


class MaskedChannels(nn.Module):
  """One Bernoulli(keep) mask per sample and channel, 1x1 conv, BN, ReLU, pooled."""

  def __init__(self, channels: int, keep: float):
    super().__init__()
    self.keep = keep
    self.Conv_0 = nn.Conv2d(channels, channels, 1, bias=False)  # pylint: disable=invalid-name
    self.BatchNorm_0 = nn.BatchNorm2d(channels)  # pylint: disable=invalid-name

  def forward(self, x):
    masked = F.dropout2d(x, 1.0 - self.keep, self.training)
    return F.relu(self.BatchNorm_0(self.Conv_0(masked))).mean((2, 3))


class BranchFusion(nn.Module):
  """Each branch to ``features`` (Linear, BN, ReLU), then concat, sum or attention."""

  def __init__(self, dims: Mapping[str, int], mode: str, features: int):
    super().__init__()
    self.mode = mode
    for name, dim in dims.items():
      self.add_module(f"project_{name}", nn.Linear(dim, features, bias=False))
      self.add_module(f"norm_{name}", nn.BatchNorm1d(features))
    if mode == "attention":
      self.score = nn.Linear(features, 1, bias=False)

  def forward(self, branches: Mapping[str, torch.Tensor]):
    projected = [F.relu(getattr(self, f"norm_{n}")(getattr(self, f"project_{n}")(f)))
                 for n, f in branches.items()]
    if self.mode == "concat":
      return torch.cat(projected, -1)
    stacked = torch.stack(projected, 1)
    if self.mode == "sum":
      return stacked.sum(1)
    weights = self.score(torch.tanh(stacked))[..., 0].softmax(1)
    return torch.einsum("bn,bnd->bd", weights, stacked)


class AFNet(nn.Module):
  """fer_jax.models.afnet.AFNet on a twin backbone that has ``features``.

  The backbone's own classifier is built (its parameters count, as in Flax) but
  not used. ``forward_aux`` gives aux 'stage*', 'fpn_p3'..'fpn_p5', 'att_map',
  'region_weights', 'region_loss' and 'embedding', as the Flax model.
  """

  def __init__(self, num_classes: int, in_channels: int = 3, input_size: int = 48,
               backbone: str = "resnet18", backbone_kwargs=(),
               pyramid_stages: tuple[str, ...] = ("stage2", "stage3", "stage4"),
               use_fpn: bool = True, fpn_dim: int = 128, num_regions: int = 4,
               region_loss: str = "partition", region_margin: float = 0.02,
               channel_mask_keep: float = 0.8, fusion: str = "concat", embed_dim: int = 256,
               dropout_rate: float = 0.4):
    super().__init__()
    self.backbone = TWINS[backbone](num_classes, in_channels, input_size=input_size,
                                    **dict(backbone_kwargs))
    if not hasattr(self.backbone, "features"):
      raise ValueError(f"AFNet twin: the {backbone} twin has no features() (aux maps)")
    self.pyramid_stages, self.region_loss = tuple(pyramid_stages), region_loss
    self.region_margin = region_margin
    channels = self._stage_channels(in_channels, input_size)
    last = channels[-1]
    dims = {"global": 3 * fpn_dim if use_fpn else last}
    self.fpn = FeaturePyramid(channels, fpn_dim) if use_fpn else None
    self.regions = RegionAttention(last, num_regions) if num_regions else None
    if num_regions:
      dims["local"] = last
    self.masked_channels = (MaskedChannels(last, channel_mask_keep)
                            if channel_mask_keep < 1.0 else None)
    if channel_mask_keep < 1.0:
      dims["masked"] = last
    self.fusion = BranchFusion(dims, fusion, embed_dim)
    self.heads = Heads(embed_dim * (len(dims) if fusion == "concat" else 1), num_classes,
                       dropout_rate)

  def _stage_channels(self, in_channels: int, input_size: int) -> tuple[int, ...]:
    self.backbone.eval()
    with torch.no_grad():
      aux = self.backbone.features(torch.zeros(1, in_channels, input_size, input_size))
    self.backbone.train()
    return tuple(aux[s].shape[1] for s in self.pyramid_stages)

  def _region_loss(self, regions: dict):
    if self.region_loss == "partition":
      return partition_loss(F.log_softmax(regions["region_features"], 1))
    if self.region_loss == "region_biased":
      lead = regions["region_weights"].max(1).values - regions["face_weight"]
      return F.relu(self.region_margin - lead).mean()
    return None

  def forward_aux(self, x):
    backbone_aux = self.backbone.features(x)
    aux = {k: v for k, v in backbone_aux.items() if k == "stem" or k.startswith("stage")}
    last = backbone_aux[self.pyramid_stages[-1]]
    branches = {}
    if self.fpn is not None:
      pyramid = self.fpn([backbone_aux[s] for s in self.pyramid_stages])
      aux.update(zip(("fpn_p3", "fpn_p4", "fpn_p5"), pyramid))
      branches["global"] = torch.cat([p.mean((2, 3)) for p in pyramid], -1)
    else:
      branches["global"] = last.mean((2, 3))
    if self.regions is not None:
      regions = self.regions(last)
      branches["local"] = regions["feature"]
      aux.update(att_map=regions["att_map"], region_weights=regions["region_weights"])
      region_loss = self._region_loss(regions)
      if region_loss is not None:
        aux["region_loss"] = region_loss
    if self.masked_channels is not None:
      branches["masked"] = self.masked_channels(last)
    aux["embedding"] = self.fusion(branches)
    return self.heads(aux["embedding"]), aux

  def forward(self, x):
    return self.forward_aux(x)[0]


# --- Loss terms (fer_jax.losses, fer_jax.objectives) --------------------------
# In float32 whatever the autocast dtype, as fer_jax's losses cast their inputs.


def hinton_kd(student_logits, teacher_logits, temperature: float):
  """T^2 KL(p_t^T || p_s^T): sum over classes, mean over the batch."""
  log_p_student = F.log_softmax(student_logits.float() / temperature, -1)
  log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, -1)
  return temperature**2 * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean",
                                   log_target=True)


def standardize_channels(feature, eps: float = 1e-6):
  """Each channel of an NCHW map to zero mean, unit (unbiased) std over (B, H, W)."""
  feature = feature.float()
  mean = feature.mean((0, 2, 3), keepdim=True)
  std = feature.std((0, 2, 3), keepdim=True, unbiased=True)
  return (feature - mean) / (std + eps)


def spatially_weighted_feature_loss(student, teacher, weight_map, standardize: bool = False):
  """sum w * mean_c (s - t)^2 / sum w, on same-size NCHW maps; ``weight_map`` [B, H, W]."""
  student, teacher = student.float(), teacher.detach().float()
  if standardize:
    student, teacher = standardize_channels(student), standardize_channels(teacher)
  per_location = (student - teacher).square().mean(1)
  weight_map = weight_map.float()
  return (weight_map * per_location).sum() / weight_map.sum().clamp_min(1e-12)


class FeatureAdapter(nn.Module):
  """The 1x1 conv mapping a student map to its teacher map's channels."""

  def __init__(self, in_ch: int, out_ch: int):
    super().__init__()
    self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)

  def forward(self, x):
    return self.conv(x)


class MKDSpatialAttention(nn.Module):
  """objectives._SpatialAttention: a softmax map over a teacher map, trained by a probe."""

  def __init__(self, channels: int, num_classes: int, hidden: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
    self.conv2 = nn.Conv2d(hidden, 1, 1)
    self.probe = nn.Linear(channels, num_classes)

  def forward(self, teacher_feature, labels):
    scores = self.conv2(F.relu(self.conv1(teacher_feature)))[:, 0]
    b, h, w = scores.shape
    weights = scores.reshape(b, -1).float().softmax(-1).reshape(b, h, w)
    pooled = torch.einsum("bhw,bchw->bc", weights.to(teacher_feature.dtype), teacher_feature)
    return weights, F.cross_entropy(self.probe(pooled).float(), labels)


class MultiLayerKD(nn.Module):
  """objectives.MultiLayerKD ('learned' or 'uniform' attention); Flax names under 'mkd'.

  ``forward(student_aux, teacher_aux, labels)``: the mean over pairs of the
  attention net's own loss plus the attention-weighted feature loss.
  """

  def __init__(self, pairs, student_channels: Mapping[str, int],
               teacher_channels: Mapping[str, int], num_classes: int,
               attention: str = "learned", standardize: bool = False):
    super().__init__()
    if attention not in ("learned", "uniform"):
      raise ValueError(f"MultiLayerKD twin: attention {attention!r} is not mirrored")
    self.pairs, self.attention, self.standardize = tuple(map(tuple, pairs)), attention, standardize
    self.adapt = nn.Module()
    for i, (s, t) in enumerate(self.pairs):
      self.adapt.add_module(f"adapter_{i}", FeatureAdapter(student_channels[s],
                                                           teacher_channels[t]))
      if attention == "learned":
        self.add_module(f"attention_{i}", MKDSpatialAttention(teacher_channels[t], num_classes))

  def forward(self, student_aux, teacher_aux, labels):
    total = 0.0
    for i, (s, t) in enumerate(self.pairs):
      t_feat = teacher_aux[t].detach()
      s_feat = getattr(self.adapt, f"adapter_{i}")(student_aux[s])
      if self.attention == "learned":
        weights, attention_loss = getattr(self, f"attention_{i}")(t_feat, labels)
        weights = weights.detach()
      else:
        weights, attention_loss = t_feat.new_ones(t_feat.shape[0], *t_feat.shape[2:]), 0.0
      total = total + attention_loss + spatially_weighted_feature_loss(
          s_feat, t_feat, weights, self.standardize)
    return total / len(self.pairs)


def _mobilenet_v2(num_classes, in_channels=3, stem="imagenet", input_size=224, **fields):
  del input_size  # no size-dependent layers
  return MobileNetV2(num_classes, in_channels, stem, **fields)


def _efficientformer(variant: str) -> Callable[..., nn.Module]:
  def build(num_classes, in_channels=3, stem="imagenet", input_size=224, **fields):
    return EfficientFormer(num_classes, in_channels, stem, variant, input_size, **fields)
  return build


def _vgg_fer(num_classes, in_channels=3, stem="imagenet", input_size=48, **fields):
  if stem != "imagenet":
    raise ValueError("VGGFer has a single stem")
  return VGGFer(num_classes, in_channels, input_size=input_size, **fields)


def _afnet(num_classes, in_channels=3, stem="imagenet", input_size=48, **fields):
  if stem != "imagenet":
    raise ValueError("AFNet has no stem field; give the backbone's in backbone_kwargs")
  return AFNet(num_classes, in_channels, input_size, **fields)


# name -> constructor(num_classes, in_channels, stem, input_size, **family fields);
# input_size is the square input side, for layers sized from the final map.
TWINS: Mapping[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": _mobilenet_v2,
    "efficientformer_l1": _efficientformer("l1"),
    "efficientformer_l3": _efficientformer("l3"),
    "mobilefacenet": MobileFaceNet,
    "vgg_fer": _vgg_fer,
    "afnet": _afnet,
}

# Flax leaf name -> candidate torch names, tried in order against the twin.
_LEAF_NAMES = {
    "kernel": ("weight",),
    "scale": ("weight", "scale"),  # BatchNorm/LayerNorm weight, or LayerScale
    "slope": ("weight",),  # ChannelPReLU
    "mean": ("running_mean",),
    "var": ("running_var",),
}


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if leaf == "kernel" and value.ndim == 2:  # [in, out] -> [out, in]
    return value.T
  return value


def load_flax_variables(model: nn.Module, variables: Mapping) -> None:
  """Copies Flax ``{'params', 'batch_stats'}`` into a twin, every tensor exactly once.

  Raises:
    KeyError: a Flax leaf has no counterpart in the twin, or a twin tensor was
      left unset.
  """
  state = model.state_dict()
  unset = {k for k in state if not k.endswith("num_batches_tracked")}
  for collection in ("params", "batch_stats"):
    for path, value in _flatten(variables.get(collection, {})):
      *modules, leaf = path
      prefix = ".".join(modules)
      names = [f"{prefix}.{n}" for n in _LEAF_NAMES.get(leaf, (leaf,))]
      key = next((n for n in names if n in state), None)
      if key is None:
        raise KeyError(f"{collection}/{'/'.join(path)} has no twin tensor among {names}")
      tensor = torch.from_numpy(np.array(_to_torch_layout(np.asarray(value), leaf)))
      if tensor.shape != state[key].shape:
        raise KeyError(f"{key}: twin shape {tuple(state[key].shape)} != {tuple(tensor.shape)}")
      state[key] = tensor
      unset.discard(key)
  if unset:
    raise KeyError(f"twin tensors not set from Flax: {sorted(unset)}")
  model.load_state_dict(state)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def load_reference_state_dict(model: nn.Module, reference: Mapping[str, torch.Tensor],
                              skip: tuple[str, ...] = ()) -> None:
  """Copies a reference implementation's weights into a twin, in order.

  The twins register their tensors in the same order as torchvision's
  ``mobilenet_v2`` and timm 1.0's ``efficientformer_l*``, so the i-th
  reference tensor is the i-th twin tensor. A library version that orders them
  differently fails the shape check. ``skip`` names reference keys (substrings)
  that have no twin counterpart, e.g. timm's ``head_dist`` and
  ``attention_bias_idxs``. ``num_batches_tracked`` counters are skipped as well.

  Raises:
    ValueError: the two lists differ in length or in a shape.
  """
  source = [(k, v) for k, v in reference.items()
            if "num_batches_tracked" not in k and not any(s in k for s in skip)]
  target = [k for k in model.state_dict() if "num_batches_tracked" not in k]
  if len(source) != len(target):
    raise ValueError(f"reference has {len(source)} tensors, twin {len(target)}")
  state = model.state_dict()
  for (source_key, value), key in zip(source, target):
    if value.shape != state[key].shape:
      raise ValueError(f"{source_key} {tuple(value.shape)} -> {key} {tuple(state[key].shape)}")
    state[key] = value
  model.load_state_dict(state)
