"""AffectNet (Mollahosseini, Hasani, Mahoor, "AffectNet: A Database for Facial
Expression, Valence, and Arousal Computing in the Wild", IEEE TAC 2017) as a
TFDS builder.

The official release: ``training.csv`` / ``validation.csv`` (columns
``subDirectory_filePath, face_x, face_y, face_width, face_height,
facial_landmarks, expression, valence, arousal``; the released validation.csv
has no header line) and the images under ``Manually_Annotated_Images/``.
Expressions 0..7 follow ``classes.AFFECTNET8``; 8..10 (none, uncertain,
non-face) are dropped, and so is 7 (contempt) in the 7-class configs. Splits
train / validation (the official test set is not public) plus the RAN
occlusion and pose lists, which are subsets of validation.

Reconstruction choices (the papers do not fix them; each is a config field):
the face is cut as a square of side ``crop_scale * max(face_width,
face_height)`` around the box centre, zero-padded outside the image, and
resized to ``image_size``. ``cleaned`` applies EmoNet's consistency filter
(Toisoul et al. 2021, face-analysis/emonet): an image is kept only if its label
agrees with its valence v and arousal a (intensity = sqrt(v^2 + a^2)): neutral
needs intensity < 0.2; happy v > 0; sad v < 0; surprise a > 0; fear a >= 0 and
v <= 0; anger a > 0; contempt v < 0; each of those with intensity > 0.2, and
disgust needs v < 0 and intensity > 0.3. It also drops rows whose column
``expression_correct`` is false (EmoNet's own lists have that column; the
official csv does not). The filter applies to every split.
"""
import dataclasses
import math
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from fer_jax.data import classes
from fer_jax.data.tfds_builders import common
from fer_jax.data.tfds_builders import ran_lists

_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
            "face_height", "expression", "valence", "arousal")
# The official validation.csv has no header line; its columns are these.
_RELEASE_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
                    "face_height", "facial_landmarks", "expression", "valence",
                    "arousal")
_NUM_EXPRESSION_IDS = 11  # 0..7 emotions, 8 none, 9 uncertain, 10 non-face
_SPLIT_FILES = {"train": "training.csv", "validation": "validation.csv"}
_IMAGE_ROOT = "Manually_Annotated_Images"

CITATION = """@article{mollahosseini2017affectnet,
  title={AffectNet: A database for facial expression, valence, and arousal computing in the wild},
  author={Mollahosseini, Ali and Hasani, Behzad and Mahoor, Mohammad H},
  journal={IEEE Transactions on Affective Computing}, year={2017}}"""

LAYOUTS = """The AffectNet release, anywhere up to four folders deep in manual_dir:
  training.csv, validation.csv   (subDirectory_filePath, face_x, face_y, face_width,
                                  face_height, facial_landmarks, expression, valence, arousal;
                                  a file without this header line is read in this order)
  Manually_Annotated_Images/<subDirectory_filePath>
Optionally the RAN lists occlusion_affectnet_list.txt, pose_30_affectnet_list.txt,
pose_45_affectnet_list.txt (kaiwang960112/Challenge-condition-FER-dataset)."""


def emonet_consistent(expression: int, valence: float, arousal: float) -> bool:
  """EmoNet's "cleaned" rule: does the label agree with valence/arousal?"""
  intensity = math.hypot(valence, arousal)
  if expression == 0:
    return intensity < 0.2
  rules = {1: valence > 0, 2: valence < 0, 3: arousal > 0,
           4: arousal >= 0 and valence <= 0, 5: valence < 0, 6: arousal > 0,
           7: valence < 0}
  threshold = 0.3 if expression == 5 else 0.2
  return rules[expression] and intensity > threshold


@dataclasses.dataclass(eq=False)
class AffectnetConfig(tfds.core.BuilderConfig):
  num_classes: int = 8
  image_size: int = 224
  cleaned: bool = False
  crop_scale: float = 1.0
  image_encoding: str = "jpeg"


def make_config(num_classes: int = 8, image_size: int = 224,
                cleaned: bool = False, crop_scale: float = 1.0,
                image_encoding: str = "jpeg") -> AffectnetConfig:
  if num_classes not in (7, 8):
    raise ValueError(f"AffectNet num_classes must be 7 or 8, got {num_classes}")
  if image_size <= 0 or crop_scale <= 0:
    raise ValueError(f"AffectNet image_size and crop_scale must be positive, got "
                     f"{image_size} and {crop_scale}")
  if image_encoding not in common.IMAGE_ENCODINGS:
    raise ValueError(f"image_encoding {image_encoding!r} is not one of "
                     f"{common.IMAGE_ENCODINGS}")
  name = f"{num_classes}cls_{image_size}px"
  if cleaned:
    name += "_cleaned"
  if crop_scale != 1.0:
    name += f"_crop{crop_scale:g}"
  if image_encoding != "jpeg":
    name += f"_{image_encoding}"
  return AffectnetConfig(
      name=name, num_classes=num_classes, image_size=image_size, cleaned=cleaned,
      crop_scale=crop_scale, image_encoding=image_encoding,
      description=f"{num_classes} classes, {image_size}px crops"
      + (", EmoNet-cleaned" if cleaned else ""))


@dataclasses.dataclass(frozen=True)
class _Row:
  line: int
  index: int
  path: str
  box: tuple[float, float, float, float]
  expression: int
  valence: float
  arousal: float
  expression_correct: bool


def read_rows(path: pathlib.Path) -> list[_Row]:
  """Every row of training.csv / validation.csv, checked."""
  rows = []
  for index, (line, row) in enumerate(
      common.read_csv(path, _COLUMNS, headerless_columns=_RELEASE_COLUMNS)):
    where = common.location(path, line)
    expression = common.parse_number(row["expression"], int, where, "expression")
    if not 0 <= expression < _NUM_EXPRESSION_IDS:
      raise common.DataError(f"{where}: unknown label {expression}; expected "
                             "0..10 (0..7 emotions, 8 none, 9 uncertain, 10 non-face)")
    box = tuple(common.parse_number(row[c], float, where, c)
                for c in ("face_x", "face_y", "face_width", "face_height"))
    if box[2] <= 0 or box[3] <= 0:
      raise common.DataError(f"{where}: face box {box} has no area; expected "
                             "face_width and face_height > 0")
    correct = row.get("expression_correct", "true").strip().lower()
    rows.append(_Row(
        line=line, index=index, path=row["subDirectory_filePath"], box=box,
        expression=expression,
        valence=common.parse_number(row["valence"], float, where, "valence"),
        arousal=common.parse_number(row["arousal"], float, where, "arousal"),
        expression_correct=correct not in ("false", "0")))
  return rows


class Affectnet(tfds.core.GeneratorBasedBuilder):
  """AffectNet expressions with valence and arousal, face crops of a configured size."""
  name = "affectnet"
  VERSION = common.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUTS
  BUILDER_CONFIGS = [make_config(8), make_config(7),
                     make_config(8, image_size=256, cleaned=True)]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=("AffectNet manually annotated images: face crops, "
                     f"{config.num_classes} expressions, valence and arousal in "
                     "[-1, 1]; 'index' is the csv data row."),
        features=tfds.features.FeaturesDict({
            "image": common.image_feature((size, size, 3), config.image_encoding),
            "label": tfds.features.ClassLabel(
                names=classes.AFFECTNET8[:config.num_classes]),
            "valence": tfds.features.Scalar(dtype=np.float32),
            "arousal": tfds.features.Scalar(dtype=np.float32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="http://mohammadmahoor.com/affectnet/",
        citation=CITATION,
    )

  def _keep(self, row: _Row) -> bool:
    config = self.builder_config
    if row.expression >= config.num_classes:
      return False
    return not config.cleaned or (row.expression_correct and emonet_consistent(
        row.expression, row.valence, row.arousal))

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    image_root = common.find(manual_dir, _IMAGE_ROOT)
    csv_paths = {split: common.find(manual_dir, name)
                 for split, name in _SPLIT_FILES.items()}
    if image_root is None or None in csv_paths.values():
      raise FileNotFoundError(f"AffectNet files missing in {manual_dir}; "
                              f"expected:\n{LAYOUTS}")
    splits, validation = {}, []
    for split, csv_path in csv_paths.items():
      rows = read_rows(csv_path)
      if split == "validation":
        validation = rows
      splits[split] = self._generate_examples(
          image_root, csv_path,
          [(row.line, row, row.expression) for row in rows if self._keep(row)])
    stems = {pathlib.PurePath(row.path).stem.lower(): i
             for i, row in enumerate(validation)}
    num_classes = self.builder_config.num_classes
    for split, path in ran_lists.find_lists(manual_dir, ran_lists.AFFECTNET).items():
      entries = ran_lists.match(path, ran_lists.AFFECTNET[split], stems,
                                len(classes.AFFECTNET8))
      splits[split] = self._generate_examples(
          image_root, csv_paths["validation"],
          [(line, validation[i], label) for line, i, label in entries
           if label < num_classes])
    return splits

  def _generate_examples(self, image_root: pathlib.Path, csv_path: pathlib.Path,
                         entries):
    config = self.builder_config
    for key, row, label in entries:
      where = common.location(csv_path, row.line)
      if not (-1 <= row.valence <= 1 and -1 <= row.arousal <= 1):
        raise common.DataError(f"{where}: valence {row.valence} / arousal "
                               f"{row.arousal} outside the expected [-1, 1]")
      image_path = image_root / row.path
      if not image_path.is_file():
        raise common.DataError(f"{where}: image {image_path} is missing")
      image = common.decode_image(image_path, "RGB", where)
      x, y, width, height = row.box
      side = config.crop_scale * max(width, height)
      cx, cy = x + width / 2, y + height / 2
      crop = common.crop_and_resize(
          image, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2),
          config.image_size)
      yield key, {"image": common.encode_image(crop, config.image_encoding),
                  "label": label, "valence": row.valence,
                  "arousal": row.arousal, "index": row.index}
