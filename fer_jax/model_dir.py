"""A trained model as one object, saved and loaded as one directory.

A model directory holds two files:

  ``model.json``: the format version, the registered model name and its
    constructor fields, the class names, the number of valence/arousal
    outputs, and the preprocessing: the image shape the model was trained on
    (``image_shape``, e.g. 48x48x1 for FER2013), the per-channel ``mean``/
    ``std`` of ``(x / 255 - mean) / std`` on that image, and the model's own
    ``input_shape`` (the normalised image is resized and its channels
    converted to it, bilinear, as in training);
  ``variables.msgpack``: the Flax variables (``params``, ``batch_stats``),
    written with ``flax.serialization`` (no pickle).

Loading builds no optimizer and needs no training data. Saving writes into a
temporary sibling directory and renames it into place, so an interrupted save
leaves either the previous directory or none, never a half-written one.
"""
import dataclasses
import importlib.resources
import json
import os
import pathlib
import shutil
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fer_jax import models
from fer_jax import steps
from fer_jax.data import augment

FORMAT_VERSION = 1
_SPEC_FILE = "model.json"
_VARIABLES_FILE = "variables.msgpack"


class ModelDirError(ValueError):
  """A model directory that is missing, incomplete or of another format version."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model's architecture, weights and preprocessing."""
  model: str
  model_kwargs: dict
  class_names: tuple[str, ...]
  variables: Any
  image_shape: tuple[int, int, int]
  input_shape: tuple[int, int, int]
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)
  num_va: int = 0

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def module(self):
    """The Linen module (the same construction as in training)."""
    return models.build(self.model, num_classes=self.num_classes, **self.model_kwargs)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8 ``[B, *image_shape]`` -> the model's float32 input, as in evaluation."""
    x = augment.preprocess_eval(images, {"mean": self.mean, "std": self.std})
    return steps.adapt_input(x, self.input_shape)

  def forward(self, variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, K], va [B, num_va])`` of uint8 images under ``variables``; pure."""
    logits, aux = self.module().apply(variables, self.preprocess(images), train=False)
    return logits, aux.get("va", jnp.zeros((logits.shape[0], 0), logits.dtype))

  def apply(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``forward`` with this model's own variables."""
    return self.forward(self.variables, images)

  def spec(self) -> dict:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != "variables"}
    return {"format_version": FORMAT_VERSION, **_jsonable(fields)}

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    """Writes the directory atomically (replacing an older one); returns its path."""
    target = pathlib.Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
      variables = jax.tree.map(np.asarray, jax.device_get(self.variables))
      (staging / _VARIABLES_FILE).write_bytes(flax.serialization.msgpack_serialize(variables))
      (staging / _SPEC_FILE).write_text(json.dumps(self.spec(), indent=1) + "\n")
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    _replace_dir(staging, target)
    return target


def flip_averaged(forward):
  """``forward`` (a ``TrainedModel.forward``) averaged over each face and its mirror
  image: probabilities, returned as log-probabilities, so that argmax and softmax read
  them as logits; V/A averaged too. Faces are ``[B, H, W, C]``."""

  def averaged(variables, images):
    logits, va = forward(variables, images)
    mirrored_logits, mirrored_va = forward(variables, images[:, :, ::-1])
    probs = (jax.nn.softmax(logits) + jax.nn.softmax(mirrored_logits)) / 2
    return jnp.log(probs), (va + mirrored_va) / 2

  return averaged


def _jsonable(value):
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _replace_dir(staging: pathlib.Path, target: pathlib.Path) -> None:
  """Moves ``staging`` to ``target``; an older ``target`` is removed only after."""
  old = target.with_name(f".{target.name}.old-{os.getpid()}")
  if target.exists():
    os.replace(target, old)
  os.replace(staging, target)
  shutil.rmtree(old, ignore_errors=True)


def _tuple_tree(value):
  """JSON lists back to the tuples Linen fields and shapes expect."""
  if isinstance(value, dict):
    return {k: _tuple_tree(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuple_tree(v) for v in value)
  return value


def pretrained_dir() -> pathlib.Path:
  """Where the shipped model directories live: ``fer_jax/pretrained/<name>/``."""
  return pathlib.Path(str(importlib.resources.files("fer_jax") / "pretrained"))


def pretrained_names() -> list[str]:
  root = pretrained_dir()
  return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def resolve(name_or_dir: str | os.PathLike) -> pathlib.Path:
  """A shipped model's directory by name, else ``name_or_dir`` as a path."""
  text = os.fspath(name_or_dir)
  if text and "/" not in text and os.sep not in text and text not in (".", ".."):
    if (pretrained_dir() / text).is_dir():
      return pretrained_dir() / text
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    return path
  raise ModelDirError(f"{text}: neither a model directory nor a shipped model name "
                      f"(shipped: {', '.join(pretrained_names()) or 'none'})")


def load(name_or_dir: str | os.PathLike) -> TrainedModel:
  """Reads a model directory (or a shipped model by name); ModelDirError says what is wrong."""
  path = resolve(name_or_dir)
  spec_path, variables_path = path / _SPEC_FILE, path / _VARIABLES_FILE
  for needed in (spec_path, variables_path):
    if not needed.is_file():
      raise ModelDirError(f"{path}: not a fer_jax model directory (no {needed.name})")
  try:
    spec = json.loads(spec_path.read_text())
  except json.JSONDecodeError as e:
    raise ModelDirError(f"{spec_path}: not valid JSON ({e})") from None
  version = spec.pop("format_version", None)
  if version != FORMAT_VERSION:
    raise ModelDirError(f"{path}: model format version {version}; this fer_jax reads "
                        f"version {FORMAT_VERSION}")
  try:
    variables = flax.serialization.msgpack_restore(variables_path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on corrupt bytes
    raise ModelDirError(f"{variables_path}: unreadable variables ({e})") from None
  spec = _tuple_tree(spec)
  spec["model_kwargs"] = dict(spec["model_kwargs"])
  return TrainedModel(variables=variables, **spec)
