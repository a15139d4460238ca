"""Tests of fer_jax.tools.count against published counts and MAC formulas."""
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fer_jax.tools import count as count_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _macs(fn, *shapes):
  jaxpr = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, jnp.float32)
                               for s in shapes))
  return count_lib.jaxpr_macs(jaxpr.jaxpr)


def test_conv_macs_follow_window_times_input_channels_per_group():
  def grouped_strided_conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(2, 2), padding=((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2)

  # x [2, 6, 9, 9], kernel [O=4, I=6/2, 3, 3] -> out [2, 4, 5, 5].
  expected = (2 * 4 * 5 * 5) * (3 * 3 * 3)
  assert _macs(grouped_strided_conv, (2, 6, 9, 9), (4, 3, 3, 3)) == expected


def test_dot_macs_count_batch_dims_once_and_contract_all_dims():
  def batched_matmul(a, b):
    return jnp.einsum("bij,bjk->bik", a, b)

  def two_axis_contraction(a, b):
    return jnp.einsum("ijk,jkl->il", a, b)

  assert _macs(batched_matmul, (3, 4, 5), (3, 5, 6)) == 3 * 4 * 6 * 5
  assert _macs(two_axis_contraction, (2, 3, 4), (3, 4, 5)) == 2 * 5 * 3 * 4


def test_macs_recurse_into_jit_scan_and_cond():
  @jax.jit
  def inner(x, w):
    return x @ w

  def scanned(x, w):
    def step(carry, _):
      return inner(carry, w), None
    return jax.lax.scan(step, x, None, length=7)[0]

  def branches(x, w):
    return jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w)

  one_matmul = 2 * 4 * 4
  assert _macs(scanned, (2, 4), (4, 4)) == 7 * one_matmul
  assert _macs(branches, (2, 4), (4, 4)) == 2 * one_matmul


def test_resnet18_matches_published_counts():
  result = count_lib.count("resnet18", (224, 224, 3))
  # torchvision ResNet18_Weights.IMAGENET1K_V1: 11,689,512 params, 1.814 GFLOPS
  # (multiply-adds); He et al. 2016, Table 1: 1.8e9.
  assert result["params"] == 11_689_512
  assert result["macs"] == pytest.approx(1.814e9, rel=1e-3)
  assert result["params"] == pytest.approx(11.7e6, rel=0.03)
  assert result["macs"] == pytest.approx(1.8e9, rel=0.03)
  # XLA skips the kernel taps that fall on padding, so its flops / 2 stay
  # below the published count even with the elementwise ops included.
  assert 0.85 < result["xla_flops"] / 2 / result["macs"] < 1.0


def test_resnet50_matches_published_counts():
  result = count_lib.count("resnet50", (224, 224, 3))
  # torchvision ResNet50_Weights.IMAGENET1K_V1: 25,557,032 params, 4.089 GFLOPS.
  assert result["params"] == 25_557_032
  assert result["macs"] == pytest.approx(4.089e9, rel=1e-3)
  assert result["macs"] == pytest.approx(4.1e9, rel=0.03)


def test_ir50_matches_published_counts():
  num_classes = 7
  result = count_lib.count("ir50", (112, 112, 3), num_classes=num_classes)
  # The published IR-50 ends at its 512-d embedding; drop our classifier.
  backbone = result["params"] - (512 * num_classes + num_classes)
  # openvinotoolkit/open_model_zoo, models/public/face-recognition-resnet50-
  # arcface (LResNet50E-IR, ArcFace@ms1m-refine-v1): 43.576 MParams, 12.637
  # GFLOPs at 112x112 (2 flops per MAC).
  assert backbone == pytest.approx(43.576e6, rel=1e-3)
  assert backbone == pytest.approx(43.8e6, rel=0.03)
  assert result["macs"] == pytest.approx(12.637e9 / 2, rel=0.01)


def _mini_xception_macs(height, width, num_classes):
  """Conv MACs of the Keras mini_XCEPTION layer list, written out."""
  total = 0
  h, w = height - 2, width - 2
  total += h * w * 8 * 9 * 1
  h, w = h - 2, w - 2
  total += h * w * 8 * 9 * 8
  channels = 8
  for features in (16, 32, 64, 128):
    out_h, out_w = math.ceil(h / 2), math.ceil(w / 2)
    total += out_h * out_w * features * channels  # 1x1/2 residual
    total += h * w * channels * 9 + h * w * features * channels  # separable 1
    total += h * w * features * 9 + h * w * features * features  # separable 2
    h, w, channels = out_h, out_w, features
  return total + h * w * num_classes * 9 * channels


@pytest.mark.parametrize("size", [48, 64])
def test_mini_xception_counts_depthwise_as_convolutions(size):
  result = count_lib.count("mini_xception", (size, size, 1), num_classes=7)
  # The default CPU depthwise path is elementwise; count() must still see it.
  assert result["macs"] == _mini_xception_macs(size, size, 7)


def test_cli_last_line_is_the_json_counts():
  completed = subprocess.run(
      [sys.executable, "-m", "fer_jax.tools.count", "--model=mini_xception",
       "--input=48x48x1", "--num_classes=7"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  lines = completed.stdout.strip().splitlines()
  assert len(lines) >= 2, completed.stdout
  assert json.loads(lines[-1]) == {
      "params": 56_951, "macs": _mini_xception_macs(48, 48, 7)}


@pytest.mark.parametrize("text", ["224x224", "224x224x0", "axbxc", "2x2x2x2"])
def test_parse_input_shape_rejects_malformed(text):
  with pytest.raises(ValueError, match="HxWxC"):
    count_lib.parse_input_shape(text)


def test_parse_input_shape():
  assert count_lib.parse_input_shape("112X96x3") == (112, 96, 3)


def test_count_rejects_bad_input_shape_and_unknown_model():
  with pytest.raises(ValueError, match="input_shape"):
    count_lib.count("resnet18", (224, 224))
  with pytest.raises(KeyError, match="known"):
    count_lib.count("no_such_model", (8, 8, 3))


def _mini_xception_keras_weights(num_classes):
  """(trainable, BN moving statistics) of the Keras mini_XCEPTION layer list."""
  kernels = 3 * 3 * 1 * 8 + 3 * 3 * 8 * 8
  bn_channels = 8 + 8
  channels = 8
  for features in (16, 32, 64, 128):
    kernels += channels * features  # 1x1 residual
    kernels += 9 * channels + channels * features  # separable 1
    kernels += 9 * features + features * features  # separable 2
    bn_channels += 3 * features
    channels = features
  kernels += 3 * 3 * channels * num_classes + num_classes  # classifier + bias
  return kernels + 2 * bn_channels, 2 * bn_channels


def test_params_exclude_batch_stats():
  trainable, moving_stats = _mini_xception_keras_weights(7)
  # Keras's model.summary total counts both; only the trainable ones are
  # 'params' here.
  assert (trainable, trainable + moving_stats) == (56_951, 58_423)
  result = count_lib.count("mini_xception", (48, 48, 1), num_classes=7)
  assert result["params"] == trainable


@pytest.mark.slow  # a timing check: its result depends on the machine's load
def test_cpu_images_per_second_scales_with_the_work():
  # Ten times the width is about a hundred times the MACs of the convolutions:
  # the wide model must be measurably slower per image.
  narrow, wide = (count_lib.cpu_images_per_second("resnet18", (48, 48, 1), batch_size=8,
                                                  iters=3, num_classes=7, stem="small",
                                                  width=width) for width in (4, 40))
  assert math.isfinite(narrow) and narrow > 0
  assert wide < narrow / 3
