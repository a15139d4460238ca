"""Test-only PyTorch restatement of the official EmoNet (face-analysis/emonet).

Written from a reading of ``emonet/models/emonet.py`` in
github.com/face-analysis/emonet (Toisoul et al., Nature Machine Intelligence
2021) so that its ``state_dict`` carries exactly the official key names
(``conv1.weight``, ``m0.b2_plus_1.bn1.running_mean``,
``emo_net_2.6.conv3.weight``, ``emo_fc_2.3.bias``, ...). It keeps the official
forward pass, with every norm a BatchNorm (the official code aliases
InstanceNorm2d to BatchNorm2d), and drops only what the released weights do
not use: the optional 5-frame temporal smoothing and the ``attention=False``
variant. ``n_blocks`` is exposed, as in
the official constructor, so tests can run a smaller input.
"""
import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Module):
  """Three chained pre-activation BN-ReLU-conv3x3 branches, concatenated."""

  def __init__(self, in_planes: int, out_planes: int):
    super().__init__()
    half, quarter = out_planes // 2, out_planes // 4
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, half, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(half)
    self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(quarter)
    self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
    self.downsample = None
    if in_planes != out_planes:
      self.downsample = nn.Sequential(
          nn.BatchNorm2d(in_planes), nn.ReLU(),
          nn.Conv2d(in_planes, out_planes, 1, bias=False))

  def forward(self, x):
    out1 = self.conv1(F.relu(self.bn1(x)))
    out2 = self.conv2(F.relu(self.bn2(out1)))
    out3 = self.conv3(F.relu(self.bn3(out2)))
    residual = x if self.downsample is None else self.downsample(x)
    return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
  """Recursive hourglass with the official flat block names b1_/b2_/b3_."""

  def __init__(self, depth: int = 4, features: int = 256):
    super().__init__()
    self.depth = depth
    self._add_level(depth, features)

  def _add_level(self, level, features):
    # Registration order, hence state_dict order, follows the official code.
    self.add_module(f"b1_{level}", ConvBlock(features, features))
    self.add_module(f"b2_{level}", ConvBlock(features, features))
    if level > 1:
      self._add_level(level - 1, features)
    else:
      self.add_module("b2_plus_1", ConvBlock(features, features))
    self.add_module(f"b3_{level}", ConvBlock(features, features))

  def _level(self, level, x):
    up = getattr(self, f"b1_{level}")(x)
    low = getattr(self, f"b2_{level}")(F.max_pool2d(x, 2, stride=2))
    if level > 1:
      low = self._level(level - 1, low)
    else:
      low = self.b2_plus_1(low)
    low = getattr(self, f"b3_{level}")(low)
    return up + F.interpolate(low, scale_factor=2, mode="nearest")

  def forward(self, x):
    return self._level(self.depth, x)


class EmoNet(nn.Module):
  """The official EmoNet with heatmap attention; returns the official dict."""

  def __init__(self, num_modules: int = 2, n_expression: int = 8,
               n_reg: int = 2, n_blocks: int = 4):
    super().__init__()
    self.num_modules = num_modules
    self.n_expression = n_expression
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
    self.bn1 = nn.BatchNorm2d(64)
    self.conv2 = ConvBlock(64, 128)
    self.conv3 = ConvBlock(128, 128)
    self.conv4 = ConvBlock(128, 256)
    for i in range(num_modules):
      self.add_module(f"m{i}", HourGlass(4, 256))
      self.add_module(f"top_m_{i}", ConvBlock(256, 256))
      self.add_module(f"conv_last{i}", nn.Conv2d(256, 256, 1))
      self.add_module(f"bn_end{i}", nn.BatchNorm2d(256))
      self.add_module(f"l{i}", nn.Conv2d(256, 68, 1))
      if i < num_modules - 1:
        self.add_module(f"bl{i}", nn.Conv2d(256, 256, 1))
        self.add_module(f"al{i}", nn.Conv2d(68, 256, 1))
    for p in self.parameters():  # the FAN (stem included) is frozen
      p.requires_grad = False

    self.conv1x1_input_emo_2 = nn.Conv2d(256 * (num_modules + 1), 256, 1)
    head = []
    for _ in range(n_blocks):
      head += [ConvBlock(256, 256), nn.MaxPool2d(2, 2)]
    self.emo_net_2 = nn.Sequential(*head)
    self.avg_pool_2 = nn.AvgPool2d(4)
    self.emo_fc_2 = nn.Sequential(
        nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, n_expression + n_reg))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(self.conv2(x), 2, stride=2)
    x = self.conv4(self.conv3(x))
    previous = x
    features = []
    for i in range(self.num_modules):
      ll = getattr(self, f"top_m_{i}")(getattr(self, f"m{i}")(previous))
      ll = getattr(self, f"conv_last{i}")(ll)
      ll = F.relu(getattr(self, f"bn_end{i}")(ll))
      heatmap = getattr(self, f"l{i}")(ll)
      if i < self.num_modules - 1:
        ll = getattr(self, f"bl{i}")(ll)
        previous = previous + ll + getattr(self, f"al{i}")(heatmap)
      features.append(ll)
    mask = heatmap.sum(dim=1, keepdim=True)
    emo_feat = torch.cat([x, torch.cat(features, dim=1) * mask], dim=1)
    out = self.emo_net_2(self.conv1x1_input_emo_2(emo_feat))
    out = self.avg_pool_2(out)
    out = self.emo_fc_2(out.view(out.shape[0], out.shape[1]))
    return {"heatmap": heatmap, "expression": out[:, :-2],
            "valence": out[:, -2], "arousal": out[:, -1]}
