"""Loaders of the real FER datasets, registered in ``DATASETS``.

``DATASETS.get(name)(config.data)`` returns a ``Dataset`` whose splits are
``tfds.data_source`` splits (random access, nothing loaded up front). If the
dataset is not built in ``data_dir`` yet, it is built first from
``manual_dir``, so a user only points the config at the download.

Config fields (``ml_collections.ConfigDict``; ``default_config(name)`` gives
them all with their defaults):

  every dataset:
    data_dir      TFDS data dir holding the built datasets.
    manual_dir    the downloaded files (layouts in docs/datasets.md); needed
                  only to build.
    class_order   '' keeps the dataset's native class order; 'fer7' or
                  'affectnet8' re-index labels (and soft labels) to that
                  canonical order. Re-indexing never drops a class: a dataset
                  with a class the order lacks (FER+ contempt -> fer7) raises.
  ferplus:        label_mode (train split) and eval_label_mode (validation and
                  test): majority, plurality, probability, crossentropy,
                  multi_target.
  affectnet:      num_classes (7 or 8), image_size, cleaned (EmoNet filter),
                  crop_scale, image_encoding (raw / png / jpeg).
  image_folder:   dataset_name (names the built dataset), class_map (json/txt
                  file, relative to manual_dir or absolute; '' = folder names),
                  image_size, grayscale, center_crop, image_encoding.
"""
from __future__ import annotations

import functools
import pathlib
import shutil
import tempfile
from typing import Callable

from absl import logging
from etils import epy
import ml_collections
import numpy as np

from fer_jax.data import classes
from fer_jax.data.base import DATASETS, Dataset

# TFDS and the builders load when a real dataset is first read or built: training on
# arrays (the embedded faces, a packed dataset) and prediction never import them.
with epy.lazy_imports():
  import tensorflow_datasets as tfds
  from fer_jax.data.tfds_builders import affectnet
  from fer_jax.data.tfds_builders import common
  from fer_jax.data.tfds_builders import fer2013
  from fer_jax.data.tfds_builders import ferplus
  from fer_jax.data.tfds_builders import image_folder
  from fer_jax.data.tfds_builders import rafdb

CLASS_ORDERS = {"fer7": classes.FER7, "affectnet8": classes.AFFECTNET8}
_COMMON_FIELDS = {"data_dir": "~/tensorflow_datasets", "manual_dir": "",
                  "class_order": ""}
_FIELDS = {
    "fer2013": {},
    "ferplus": {"label_mode": "majority", "eval_label_mode": "majority"},
    "rafdb": {},
    "affectnet": {"num_classes": 8, "image_size": 224, "cleaned": False,
                  "crop_scale": 1.0, "image_encoding": "jpeg"},
    "image_folder": {"dataset_name": "", "class_map": "", "image_size": 64,
                     "grayscale": False, "center_crop": True,
                     "image_encoding": "png"},
}
NAMES = tuple(_FIELDS)
# Record fields whose stored dtype differs from the dataset contract.
_CONTRACT_DTYPES = {"label": np.int32, "index": np.int64,
                    "soft_label": np.float32, "valence": np.float32,
                    "arousal": np.float32}


def default_config(name: str) -> ml_collections.ConfigDict:
  """Every config field of dataset ``name`` with its default."""
  if name not in _FIELDS:
    raise KeyError(f"no real dataset {name!r}; known: {', '.join(NAMES)}")
  return ml_collections.ConfigDict({"name": name, **_COMMON_FIELDS, **_FIELDS[name]})


def _field(cfg, name: str, key: str):
  value = cfg.get(key, None)
  return _FIELDS[name].get(key, _COMMON_FIELDS.get(key)) if value is None else value


class Records:
  """A data-source split whose records follow the dataset contract.

  Stored scalars come back from TFDS as Python ints/floats; this casts them to
  the contract's dtypes and, given ``label_map``, re-indexes classes.
  """

  def __init__(self, source, label_map: np.ndarray | None = None,
               num_classes: int = 0):
    self.source = source
    self.label_map = label_map
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._convert(self.source[index])

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self._convert(r) for r in self.source.__getitems__(list(indices))]

  def _convert(self, record) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, _CONTRACT_DTYPES.get(k)) for k, v in record.items()}
    if self.label_map is not None:
      out["label"] = self.label_map[out["label"]].astype(np.int32)
      if "soft_label" in out:
        soft = np.zeros(self.num_classes, np.float32)
        soft[self.label_map] = out["soft_label"]
        out["soft_label"] = soft
    return out


def prepare(builder: tfds.core.DatasetBuilder, manual_dir) -> None:
  """Builds ``builder`` as array_record from ``manual_dir``; on failure removes what it created.

  TFDS writes into a temporary folder and renames it when complete, so a
  failed or killed build never leaves a dataset that loads.
  """
  manual = common.check_manual_dir(manual_dir, builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
  data_path = pathlib.Path(builder.data_path)
  data_dir = pathlib.Path(builder.data_dir_root)
  candidates = [data_dir, data_dir / builder.name, data_path.parent]
  created = next((p for p in candidates if not p.exists()), None)
  try:
    with tempfile.TemporaryDirectory() as download_dir:
      builder.download_and_prepare(
          download_dir=download_dir, file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  except BaseException:
    if created is not None:
      shutil.rmtree(created, ignore_errors=True)
    raise


def _built_path(data_dir: pathlib.Path, builder_cls, config_name: str | None):
  path = data_dir / builder_cls.name
  if config_name:
    path = path / config_name
  return path / str(common.VERSION)


def load_tfds(name: str, builder_cls, config_name: str | None,
              make_config: Callable[[], tfds.core.BuilderConfig] | None,
              cfg) -> Dataset:
  """Opens (building first if needed) one TFDS dataset as a contract ``Dataset``."""
  data_dir = pathlib.Path(_field(cfg, name, "data_dir")).expanduser()
  path = _built_path(data_dir, builder_cls, config_name)
  if not (path / "dataset_info.json").is_file():
    manual_dir = _field(cfg, name, "manual_dir")
    if not manual_dir:
      raise FileNotFoundError(
          f"dataset {name!r} is not built at {path} and config field "
          f"manual_dir is empty: set it to the download\nexpected:\n"
          f"{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    config = make_config() if make_config else None
    if config is not None:
      # TFDS refuses a new object named like one of the class's own configs.
      config = builder_cls.builder_configs.get(config.name, config)
    logging.info("Building %s from %s into %s", name, manual_dir, data_dir)
    prepare(builder_cls(data_dir=str(data_dir), config=config), manual_dir)
  builder = tfds.builder_from_directory(str(path))
  class_names = tuple(builder.info.features["label"].names)
  label_map = None
  order = _field(cfg, name, "class_order")
  if order:
    if order not in CLASS_ORDERS:
      raise ValueError(f"class_order {order!r} is not one of '', "
                       f"{', '.join(CLASS_ORDERS)}")
    label_map = classes.mapping(class_names, CLASS_ORDERS[order])
    class_names = CLASS_ORDERS[order]
  splits = {split: Records(source, label_map, len(class_names))
            for split, source in builder.as_data_source().items()}
  return Dataset(name=name, class_names=class_names, splits=splits)


@DATASETS.register("fer2013")
def load_fer2013(cfg) -> Dataset:
  """FER2013: train / public_test / private_test, FER7 classes."""
  return load_tfds("fer2013", fer2013.Fer2013, None, None, cfg)


@DATASETS.register("ferplus")
def load_ferplus(cfg) -> Dataset:
  """FER+: train / validation / test (+ RAN lists), 8 classes, a label mode."""
  config = ferplus.make_config(_field(cfg, "ferplus", "label_mode"),
                               _field(cfg, "ferplus", "eval_label_mode"))
  return load_tfds("ferplus", ferplus.Ferplus, config.name, lambda: config, cfg)


@DATASETS.register("rafdb")
def load_rafdb(cfg) -> Dataset:
  """RAF-DB basic: train / test (+ RAN lists), 7 classes in RAF-DB order."""
  return load_tfds("rafdb", rafdb.Rafdb, None, None, cfg)


@DATASETS.register("affectnet")
def load_affectnet(cfg) -> Dataset:
  """AffectNet: train / validation (+ RAN lists), 7 or 8 classes, valence/arousal."""
  field = functools.partial(_field, cfg, "affectnet")
  config = affectnet.make_config(
      field("num_classes"), field("image_size"), field("cleaned"),
      field("crop_scale"), field("image_encoding"))
  return load_tfds("affectnet", affectnet.Affectnet, config.name, lambda: config,
                   cfg)


@DATASETS.register("image_folder")
def load_image_folder(cfg) -> Dataset:
  """A class-folder collection (CK+, JAFFE, KDEF, ...), named by ``dataset_name``."""
  field = functools.partial(_field, cfg, "image_folder")
  options = dict(image_size=field("image_size"), grayscale=field("grayscale"),
                 center_crop=field("center_crop"),
                 image_encoding=field("image_encoding"))
  config_name = image_folder.config_name(field("dataset_name"), **options)

  def make_config():
    return image_folder.make_config(field("manual_dir"), field("dataset_name"),
                                    field("class_map") or None, **options)

  path = _built_path(pathlib.Path(field("data_dir")).expanduser(),
                     image_folder.FerImageFolder, config_name)
  if field("manual_dir") and (path / "dataset_info.json").is_file():
    built = tuple(tfds.builder_from_directory(str(path)).info.features["label"].names)
    expected = make_config().class_names
    if built != expected:
      raise ValueError(
          f"the image_folder dataset built at {path} has classes {built} but "
          f"{field('manual_dir')} now gives {expected}; choose a new "
          "dataset_name or delete the built dataset")
  return load_tfds("image_folder", image_folder.FerImageFolder, config_name,
                   make_config, cfg)
