"""FER2013 (Goodfellow et al., "Challenges in Representation Learning: A report
on three machine learning contests", ICONIP 2013) as a TFDS builder.

35,887 grey 48x48 faces in 7 classes with the official Training / PublicTest /
PrivateTest split. Three download layouts are accepted (the first found wins,
in this order, because the csv and npz pixels are lossless):

  * ``fer2013.csv`` (columns ``emotion,pixels,Usage``), the Kaggle original;
  * ``fer2013.npz``, the packed form of ``shared/data`` (``pixels``, ``emotion``,
    ``usage``, ``row_known``, ``ferplus_votes`` ...);
  * the Kaggle image-folder layout ``train/<emotion>/*.jpg`` and
    ``test/<emotion>/{PublicTest,PrivateTest}_*.jpg`` (lossy JPEG pixels).

The reading functions here are shared with the FER+ builder.
"""
import dataclasses
import pathlib
import warnings

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from fer_jax.data import classes
from fer_jax.data.tfds_builders import common

IMAGE_SHAPE = (48, 48, 1)
USAGES = ("Training", "PublicTest", "PrivateTest")
SPLITS = ("train", "public_test", "private_test")
NUM_VOTES = 10
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger",
                "disgust", "fear", "contempt", "unknown", "NF")
_KAGGLE_USAGE_PREFIXES = {"train": ("Training_",),
                          "test": ("PublicTest_", "PrivateTest_")}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

CITATION = """@inproceedings{goodfellow2013challenges,
  title={Challenges in representation learning: A report on three machine learning contests},
  author={Goodfellow, Ian J and Erhan, Dumitru and Carrier, Pierre Luc and Courville, Aaron and others},
  booktitle={ICONIP}, year={2013}}"""

LAYOUTS = """One of, anywhere up to four folders deep in manual_dir:
  fer2013.csv   (Kaggle: columns emotion,pixels,Usage; 48*48 space-separated grey values)
  fer2013.npz   (shared/data packing: pixels, emotion, usage, row_known, ferplus_votes, ...)
  train/<emotion>/*.jpg and test/<emotion>/{PublicTest,PrivateTest}_*.jpg
                (Kaggle image folders; <emotion> in angry, disgust, fear, happy, sad,
                surprise, neutral)
Optionally fer2013new.csv (FER+ votes, row-aligned with fer2013.csv)."""


@dataclasses.dataclass
class Fer2013Table:
  """All FER2013 images of one download, in its row order.

  ``index`` is the record's position in the download (csv row or npz index;
  -1 for Kaggle folders); ``csv_row`` the fer2013.csv row (-1 where unknown:
  Kaggle folders, npz rows with ``row_known == False``); ``votes`` the FER+
  votes (-1 where unknown); ``names`` the FER+ image names ('' where none);
  ``keys`` unique record keys.
  """
  pixels: np.ndarray
  emotion: np.ndarray
  usage: np.ndarray
  index: np.ndarray
  csv_row: np.ndarray
  votes: np.ndarray
  names: np.ndarray
  keys: list[str]


def _unknown_votes(n: int) -> np.ndarray:
  return np.full((n, NUM_VOTES), -1, np.int32)


def read_csv_table(path: pathlib.Path) -> Fer2013Table:
  """Reads Kaggle's fer2013.csv, checking each row's label, pixel count and usage."""
  pixels, emotion, usage = [], [], []
  num_pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
  for line, row in common.read_csv(path, ("emotion", "pixels", "Usage")):
    where = common.location(path, line)
    label = common.parse_number(row["emotion"], int, where, "emotion")
    if not 0 <= label < len(classes.FER7):
      raise common.DataError(f"{where}: unknown label {label}; expected 0..6 "
                             f"({', '.join(classes.FER7)})")
    if row["Usage"] not in USAGES:
      raise common.DataError(f"{where}: Usage {row['Usage']!r} is not one of {USAGES}")
    with warnings.catch_warnings():
      # A non-numeric token only warns and truncates; treat it as a short row.
      warnings.simplefilter("ignore", DeprecationWarning)
      values = np.fromstring(row["pixels"], dtype=np.int64, sep=" ")
    if values.size != num_pixels or values.min() < 0 or values.max() > 255:
      raise common.DataError(
          f"{where}: 'pixels' must hold {num_pixels} integers in 0..255 "
          f"separated by spaces; got {len(row['pixels'].split())} tokens")
    pixels.append(values.astype(np.uint8).reshape(IMAGE_SHAPE[:2]))
    emotion.append(label)
    usage.append(USAGES.index(row["Usage"]))
  n = len(emotion)
  if not n:
    raise common.DataError(f"{path}: holds no data rows")
  return Fer2013Table(
      pixels=np.stack(pixels),
      emotion=np.array(emotion, np.int64), usage=np.array(usage, np.int64),
      index=np.arange(n, dtype=np.int64), csv_row=np.arange(n, dtype=np.int64),
      votes=_unknown_votes(n),
      names=np.full(n, "", object), keys=[str(i) for i in range(n)])


def read_npz_table(path: pathlib.Path) -> Fer2013Table:
  """Reads the packed fer2013.npz; rows with ``row_known == False`` get csv_row -1."""
  with np.load(path) as data:
    required = ("pixels", "emotion", "usage", "row_known", "ferplus_name",
                "ferplus_votes")
    missing = [k for k in required if k not in data.files]
    if missing:
      raise common.DataError(f"{path}: lacks arrays {missing}; expected {required}")
    arrays = {k: data[k] for k in required}
  n = len(arrays["pixels"])
  expected = {"pixels": (n, *IMAGE_SHAPE[:2]), "emotion": (n,), "usage": (n,),
              "row_known": (n,), "ferplus_name": (n,),
              "ferplus_votes": (n, NUM_VOTES)}
  for key, shape in expected.items():
    if arrays[key].shape != shape:
      raise common.DataError(f"{path}: array {key!r} has shape "
                             f"{arrays[key].shape}; expected {shape}")
  if arrays["pixels"].dtype != np.uint8:
    raise common.DataError(f"{path}: 'pixels' is {arrays['pixels'].dtype}; expected uint8")
  for key, limit in (("emotion", len(classes.FER7)), ("usage", len(USAGES))):
    bad = np.flatnonzero((arrays[key] < 0) | (arrays[key] >= limit))
    if bad.size:
      raise common.DataError(f"{path}: {key}[{bad[0]}] = {arrays[key][bad[0]]}; "
                             f"expected 0..{limit - 1}")
  known = arrays["row_known"].astype(bool)
  votes = np.where(known[:, None], arrays["ferplus_votes"], -1).astype(np.int32)
  return Fer2013Table(
      pixels=arrays["pixels"], emotion=arrays["emotion"].astype(np.int64),
      usage=arrays["usage"].astype(np.int64),
      index=np.arange(n, dtype=np.int64),
      csv_row=np.where(known, np.arange(n), -1).astype(np.int64), votes=votes,
      names=np.where(known, arrays["ferplus_name"], "").astype(object),
      keys=[str(i) for i in range(n)])


def read_kaggle_table(root: pathlib.Path) -> Fer2013Table:
  """Reads the Kaggle ``train/`` and ``test/`` class folders under ``root``."""
  pixels, emotion, usage, keys = [], [], [], []
  for part, prefixes in _KAGGLE_USAGE_PREFIXES.items():
    for folder in sorted(p for p in (root / part).iterdir() if p.is_dir()):
      if folder.name not in classes.FER7:
        raise common.DataError(f"{folder}: unknown label folder {folder.name!r}; "
                               f"expected one of {classes.FER7}")
      for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in _IMAGE_SUFFIXES:
          continue
        prefix = next((p for p in prefixes if path.name.startswith(p)), None)
        if prefix is None:
          raise common.DataError(f"{path}: file name must start with one of "
                                 f"{prefixes} to tell its usage")
        image = common.decode_image(path, "L")
        common.check_image_size(image, *IMAGE_SHAPE[:2], str(path))
        pixels.append(image[..., 0])
        emotion.append(classes.FER7.index(folder.name))
        usage.append(USAGES.index(prefix[:-1]))
        keys.append(str(path.relative_to(root)))
  n = len(keys)
  if not n:
    raise common.DataError(f"{root}: the train/ and test/ folders hold no images")
  return Fer2013Table(
      pixels=np.stack(pixels), emotion=np.array(emotion, np.int64),
      usage=np.array(usage, np.int64), index=np.full(n, -1, np.int64),
      csv_row=np.full(n, -1, np.int64),
      votes=_unknown_votes(n), names=np.full(n, "", object), keys=keys)


def find_kaggle_root(manual_dir: pathlib.Path) -> pathlib.Path | None:
  train = common.find(manual_dir, "train")
  if train is None or not (train.parent / "test").is_dir():
    return None
  return train.parent


def read_table(manual_dir: pathlib.Path) -> Fer2013Table:
  """The FER2013 images of ``manual_dir``, from the first layout found."""
  readers = ((common.find(manual_dir, "fer2013.csv"), read_csv_table),
             (common.find(manual_dir, "fer2013.npz"), read_npz_table),
             (find_kaggle_root(manual_dir), read_kaggle_table))
  for path, reader in readers:
    if path is not None:
      logging.info("Reading FER2013 from %s", path)
      return reader(path)
  raise FileNotFoundError(f"no FER2013 data in {manual_dir}; expected:\n{LAYOUTS}")


def read_ferplus_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """fer2013new.csv as ``(usage, names, votes)``, one entry per fer2013.csv row."""
  usage, names, votes = [], [], []
  for line, row in common.read_csv(path, ("Usage", "Image name") + VOTE_COLUMNS):
    where = common.location(path, line)
    if row["Usage"] not in USAGES:
      raise common.DataError(f"{where}: Usage {row['Usage']!r} is not one of {USAGES}")
    counts = [common.parse_number(row[c], int, where, c) for c in VOTE_COLUMNS]
    if min(counts) < 0:
      raise common.DataError(f"{where}: vote counts must be >= 0; got {counts}")
    usage.append(USAGES.index(row["Usage"]))
    names.append(row["Image name"].strip())
    votes.append(counts)
  return (np.array(usage, np.int64), np.array(names, object),
          np.array(votes, np.int32).reshape(-1, NUM_VOTES))


def attach_ferplus_csv(table: Fer2013Table, path: pathlib.Path) -> None:
  """Copies FER+ names and votes of fer2013new.csv onto the rows of known csv position."""
  known = np.flatnonzero(table.csv_row >= 0)
  if not known.size:
    return
  usage, names, votes = read_ferplus_csv(path)
  if table.csv_row[known].max() >= len(usage):
    raise common.DataError(
        f"{path}: has {len(usage)} rows; expected one per fer2013.csv row "
        f"({table.csv_row[known].max() + 1} or more)")
  rows = table.csv_row[known]
  mismatch = np.flatnonzero(usage[rows] != table.usage[known])
  if mismatch.size:
    row = rows[mismatch[0]]
    raise common.DataError(
        f"{common.location(path, row + 2)}: Usage {USAGES[usage[row]]} differs "
        f"from the FER2013 row's {USAGES[table.usage[known[mismatch[0]]]]}; "
        "expected fer2013new.csv in fer2013.csv row order")
  table.votes[known] = votes[rows]
  table.names[known] = names[rows]


class Fer2013(tfds.core.GeneratorBasedBuilder):
  """FER2013 with its official three-way split, labels in FER7 order."""
  name = "fer2013"
  VERSION = common.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUTS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("FER2013: 48x48 grey faces, 7 expressions; splits "
                     "train/public_test/private_test = Training/PublicTest/"
                     "PrivateTest. 'index' is the fer2013.csv row or npz index "
                     "(-1 for Kaggle image folders), "
                     "'ferplus_votes' the FER+ votes (-1 unknown)."),
        features=tfds.features.FeaturesDict({
            "image": common.image_feature(IMAGE_SHAPE, "raw"),
            "label": tfds.features.ClassLabel(names=classes.FER7),
            "index": tfds.features.Scalar(dtype=np.int64),
            "ferplus_votes": tfds.features.Tensor(shape=(NUM_VOTES,),
                                                  dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge",
        citation=CITATION,
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    table = read_table(manual_dir)
    ferplus_csv = common.find(manual_dir, "fer2013new.csv")
    if ferplus_csv is not None:
      attach_ferplus_csv(table, ferplus_csv)
    return {split: self._generate_examples(table, usage)
            for usage, split in enumerate(SPLITS)}

  def _generate_examples(self, table: Fer2013Table, usage: int):
    for i in np.flatnonzero(table.usage == usage):
      yield table.keys[i], {
          "image": table.pixels[i][..., None],
          "label": table.emotion[i],
          "index": table.index[i],
          "ferplus_votes": table.votes[i],
      }
