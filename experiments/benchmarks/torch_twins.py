"""Hand-written PyTorch twins of fer_jax models, for speed comparisons and
output checks.

Each twin is the same architecture as the fer_jax model of the same name. It
uses the same PyTorch-style padding and BatchNorm/LayerNorm epsilons, and its
submodule names mirror the Flax module paths (``stem.conv``,
``block1_0.depthwise.bn``, ``stage4_block3.attn.qkv`` ...). That makes
``load_flax_variables`` a mechanical copy, which the tests use to check
that both frameworks compute the same function. torchvision and timm are not
needed. Twins take NCHW input and return logits only.

``TWINS`` maps a registered model name to a constructor
``(num_classes, in_channels, stem, input_size, **fields) -> torch.nn.Module``.
A new benchmark row (e.g. the AFNet teacher) is one more entry.
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


def _mobilenet_v2(num_classes, in_channels=3, stem="imagenet", input_size=224, **fields):
  del input_size  # no size-dependent layers
  return MobileNetV2(num_classes, in_channels, stem, **fields)


def _efficientformer(variant: str) -> Callable[..., nn.Module]:
  def build(num_classes, in_channels=3, stem="imagenet", input_size=224, **fields):
    return EfficientFormer(num_classes, in_channels, stem, variant, input_size, **fields)
  return build


# name -> constructor(num_classes, in_channels, stem, input_size, **family fields);
# input_size is the square input side, for layers sized from the final map.
TWINS: Mapping[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": _mobilenet_v2,
    "efficientformer_l1": _efficientformer("l1"),
    "efficientformer_l3": _efficientformer("l3"),
    "mobilefacenet": MobileFaceNet,
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
