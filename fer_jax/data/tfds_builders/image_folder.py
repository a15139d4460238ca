"""Any folder of class-named subfolders (CK+, JAFFE, KDEF, a user's own
collection) as a TFDS builder.

Layouts: ``<manual_dir>/<class folder>/<image>`` gives one ``train`` split;
``<manual_dir>/<split>/<class folder>/<image>`` with split folders named
train/training, val/valid/validation and test gives those splits. Class names
and their order come from a mapping file when given, else from the sorted
folder names:

  * ``.json``: a list of class names (each a folder name), or an object
    ``{"folder": "class name", ...}`` (several folders may share a class);
  * ``.txt``: one line per folder, ``<folder>`` or ``<folder> <class name>``.

The label order is the order in which class names first appear. Images are
decoded with Pillow to grey or RGB, cut to their centred square (or stretched,
``center_crop=False``) and resized to ``image_size``. Because the class list is
read from the folder, it is part of the builder config; a dataset is identified
by its ``dataset_name``.
"""
import dataclasses
import json
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from fer_jax.data.tfds_builders import common

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "validation",
                 "valid": "validation", "validation": "validation",
                 "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif",
                  ".pgm", ".ppm")
_DATASET_NAME = re.compile(r"[a-z0-9_]+")

LAYOUTS = """Class folders, optionally inside split folders:
  <manual_dir>/<class>/<image>                   (one 'train' split), or
  <manual_dir>/{train,val,test}/<class>/<image>
Images: JPEG, PNG, BMP, TIFF, GIF, PGM/PPM. Class names from the folder names, or
from a mapping file (json list / json object folder->class / txt '<folder> [class]')."""


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """``folder_labels`` pairs each class folder name with its label index."""
  class_names: tuple[str, ...] = ()
  folder_labels: tuple[tuple[str, int], ...] = ()
  image_size: int = 64
  grayscale: bool = False
  center_crop: bool = True
  image_encoding: str = "png"


def split_folders(manual_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Split name -> folder holding the class folders of that split."""
  folders = [p for p in sorted(manual_dir.iterdir())
             if p.is_dir() and not p.name.startswith(".")]
  if folders and all(p.name.lower() in SPLIT_FOLDERS for p in folders):
    splits = {}
    for folder in folders:
      split = SPLIT_FOLDERS[folder.name.lower()]
      if split in splits:
        raise common.DataError(f"{folder}: a second folder for split {split!r} "
                               f"(first: {splits[split]})")
      splits[split] = folder
    return splits
  return {"train": manual_dir}


def _class_folders(manual_dir: pathlib.Path) -> list[str]:
  return sorted({p.name for split_dir in split_folders(manual_dir).values()
                 for p in split_dir.iterdir()
                 if p.is_dir() and not p.name.startswith(".")})


def read_class_map(path: pathlib.Path) -> dict[str, str]:
  """Folder name -> class name from a .json or .txt mapping file, in file order."""
  if path.suffix.lower() == ".json":
    try:
      content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise common.DataError(f"{common.location(path, e.lineno)}: not valid "
                             f"JSON ({e.msg})") from None
    if isinstance(content, list) and all(isinstance(c, str) for c in content):
      return {name: name for name in content}
    if isinstance(content, dict) and all(isinstance(v, str) for v in content.values()):
      return dict(content)
    raise common.DataError(f"{path}: expected a JSON list of class names or an "
                           "object mapping folder names to class names")
  if path.suffix.lower() == ".txt":
    mapping = {}
    for text in path.read_text().splitlines():
      fields = text.split(maxsplit=1)
      if fields:
        mapping[fields[0]] = fields[-1].strip()
    return mapping
  raise common.DataError(f"{path}: class map must be a .json or .txt file")


def config_name(dataset_name: str, image_size: int, grayscale: bool,
                center_crop: bool, image_encoding: str) -> str:
  """The builder config name, which is also the built dataset's folder."""
  if not _DATASET_NAME.fullmatch(dataset_name or ""):
    raise ValueError(f"image_folder dataset_name {dataset_name!r} must match "
                     "[a-z0-9_]+ (it names the built dataset)")
  name = f"{dataset_name}_{image_size}px_{'gray' if grayscale else 'rgb'}"
  if not center_crop:
    name += "_stretch"
  if image_encoding != "png":
    name += f"_{image_encoding}"
  return name


def make_config(manual_dir, dataset_name: str, class_map: str | None = None,
                image_size: int = 64, grayscale: bool = False,
                center_crop: bool = True,
                image_encoding: str = "png") -> ImageFolderConfig:
  """The config of the folder dataset in ``manual_dir`` (reads its class folders)."""
  if image_size <= 0:
    raise ValueError(f"image_folder image_size must be positive, got {image_size}")
  if image_encoding not in common.IMAGE_ENCODINGS:
    raise ValueError(f"image_encoding {image_encoding!r} is not one of "
                     f"{common.IMAGE_ENCODINGS}")
  manual_dir = common.check_manual_dir(manual_dir, LAYOUTS)
  folders = _class_folders(manual_dir)
  if class_map:
    map_path = pathlib.Path(class_map).expanduser()
    if not map_path.is_absolute():
      map_path = manual_dir / map_path
    if not map_path.is_file():
      raise FileNotFoundError(f"class map {map_path} does not exist")
    folder_to_class = read_class_map(map_path)
    unmapped = [f for f in folders if f not in folder_to_class]
    if unmapped:
      raise common.DataError(f"{map_path}: no entry for class folders {unmapped}")
  else:
    folder_to_class = {f: f for f in folders}
  if not folder_to_class:
    raise common.DataError(f"{manual_dir}: no class folders; expected:\n{LAYOUTS}")
  class_names = tuple(dict.fromkeys(folder_to_class.values()))
  return ImageFolderConfig(
      name=config_name(dataset_name, image_size, grayscale, center_crop,
                       image_encoding),
      class_names=class_names,
      folder_labels=tuple((f, class_names.index(c))
                          for f, c in folder_to_class.items()),
      image_size=image_size, grayscale=grayscale, center_crop=center_crop,
      image_encoding=image_encoding,
      description=f"{dataset_name}: {len(class_names)} classes, {image_size}px")


class FerImageFolder(tfds.core.GeneratorBasedBuilder):
  """A class-folder image collection; every config comes from ``make_config``."""
  name = "fer_image_folder"
  VERSION = common.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUTS

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if config is None:
      raise ValueError("fer_image_folder needs a config from image_folder.make_config")
    channels = 1 if config.grayscale else 3
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{config.description}; 'index' numbers the images of a "
                     "split in sorted path order."),
        features=tfds.features.FeaturesDict({
            "image": common.image_feature(
                (config.image_size, config.image_size, channels),
                config.image_encoding),
            "label": tfds.features.ClassLabel(names=config.class_names),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(manual_dir, folder)
            for split, folder in split_folders(manual_dir).items()}

  def _generate_examples(self, manual_dir: pathlib.Path, split_dir: pathlib.Path):
    config = self.builder_config
    labels = dict(config.folder_labels)
    paths = []
    for folder in sorted(p for p in split_dir.iterdir()
                         if p.is_dir() and not p.name.startswith(".")):
      if folder.name not in labels:
        raise common.DataError(f"{folder}: class folder not in the config's "
                               f"folders {sorted(labels)}")
      paths += [(p, labels[folder.name]) for p in sorted(folder.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES]
    mode = "L" if config.grayscale else "RGB"
    for index, (path, label) in enumerate(paths):
      image = common.decode_image(path, mode)
      box = (common.center_square(*image.shape[:2]) if config.center_crop
             else (0, 0, image.shape[1], image.shape[0]))
      image = common.crop_and_resize(image, box, config.image_size)
      yield str(path.relative_to(manual_dir)), {
          "image": common.encode_image(image, config.image_encoding),
          "label": label, "index": index}
