"""RAF-DB basic (Li, Deng, Du, "Reliable Crowdsourcing and Deep
Locality-Preserving Learning for Expression Recognition in the Wild", CVPR 2017)
as a TFDS builder.

The official ``basic/`` release: ``Image/aligned/{train_NNNNN,test_NNNN}_aligned.jpg``
(100x100 RGB) and ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``,
labels 1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral, stored
here as 0..6). Splits train / test (12,271 / 3,068 in the official release) plus
the RAN occlusion and pose lists when present.
"""
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from fer_jax.data import classes
from fer_jax.data.tfds_builders import common
from fer_jax.data.tfds_builders import ran_lists

IMAGE_SHAPE = (100, 100, 3)
_LABEL_FILE = "EmoLabel/list_patition_label.txt"
_LINE = re.compile(r"(?P<split>train|test)_(?P<number>\d+)\.jpg\s+(?P<label>\d+)")

CITATION = """@inproceedings{li2017reliable,
  title={Reliable crowdsourcing and deep locality-preserving learning for expression recognition in the wild},
  author={Li, Shan and Deng, Weihong and Du, JunPing},
  booktitle={CVPR}, year={2017}}"""

LAYOUTS = """The RAF-DB basic release, anywhere up to four folders deep in manual_dir:
  basic/EmoLabel/list_patition_label.txt   ('train_00001.jpg 5', labels 1..7)
  basic/Image/aligned/train_00001_aligned.jpg ... test_3068_aligned.jpg (100x100 RGB)
Optionally the RAN lists rafdb_occlusion_list.txt, val_raf_db_list.txt,
val_raf_db_list_45.txt (kaiwang960112/Challenge-condition-FER-dataset)."""


def read_labels(path: pathlib.Path) -> list[tuple[int, str, int, int]]:
  """``(line, stem, label 0..6, number)`` per line of list_patition_label.txt."""
  entries = []
  with open(path) as f:
    for line, text in enumerate(f, start=1):
      text = text.strip()
      if not text:
        continue
      match = _LINE.fullmatch(text)
      if match is None:
        raise common.DataError(f"{common.location(path, line)}: {text!r} does not "
                               "match the expected 'train_00001.jpg <label 1-7>'")
      label = int(match["label"])
      if not 1 <= label <= len(classes.RAFDB7):
        raise common.DataError(f"{common.location(path, line)}: unknown label "
                               f"{label}; expected 1..7 ({', '.join(classes.RAFDB7)})")
      stem = f"{match['split']}_{match['number']}"
      entries.append((line, stem, label - 1, int(match["number"])))
  return entries


class Rafdb(tfds.core.GeneratorBasedBuilder):
  """RAF-DB basic, 7 classes in the release's label order."""
  name = "rafdb"
  VERSION = common.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUTS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("RAF-DB basic: aligned 100x100 faces, 7 expressions; "
                     "'index' is the number in the image name."),
        features=tfds.features.FeaturesDict({
            "image": common.image_feature(IMAGE_SHAPE, "raw"),
            "label": tfds.features.ClassLabel(names=classes.RAFDB7),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="http://www.whdeng.cn/raf/model1.html",
        citation=CITATION,
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    label_path = common.find(manual_dir, _LABEL_FILE)
    if label_path is None:
      raise FileNotFoundError(f"no {_LABEL_FILE} in {manual_dir}; expected:\n{LAYOUTS}")
    image_dir = label_path.parent.parent / "Image" / "aligned"
    entries = read_labels(label_path)
    if not entries:
      raise common.DataError(f"{label_path}: holds no labels")
    numbers = {stem: number for _, stem, _, number in entries}
    splits = {
        split: self._generate_examples(
            image_dir, label_path, numbers,
            [(stem, stem, label, line) for line, stem, label, _ in entries
             if stem.startswith(split)])
        for split in ("train", "test")}
    test_stems = {stem: stem for stem in numbers if stem.startswith("test")}
    for split, path in ran_lists.find_lists(manual_dir, ran_lists.RAFDB).items():
      matched = ran_lists.match(path, ran_lists.RAFDB[split], test_stems,
                                len(classes.RAFDB7))
      splits[split] = self._generate_examples(
          image_dir, path, numbers,
          [(line, stem, label, line) for line, stem, label in matched])
    return splits

  def _generate_examples(self, image_dir: pathlib.Path, list_path: pathlib.Path,
                         numbers: dict[str, int], entries):
    for key, stem, label, line in entries:
      where = common.location(list_path, line)
      image_path = image_dir / f"{stem}_aligned.jpg"
      if not image_path.is_file():
        raise common.DataError(f"{where}: image {image_path} is missing")
      image = common.decode_image(image_path, "RGB", where)
      common.check_image_size(image, *IMAGE_SHAPE[:2], f"{where} ({image_path})")
      yield key, {"image": image, "label": label, "index": numbers[stem]}
