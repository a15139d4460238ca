"""FER+ (Barsoum, Zhang, Canton Ferrer, Zhang, "Training deep networks for facial
expression recognition with crowd-sourced label distribution", ICMI 2016) as a
TFDS builder.

FER2013 pixels (fer2013.csv or fer2013.npz) joined with the ten FER+ votes per
image, from ``fer2013new.csv`` (row-aligned with fer2013.csv; preferred) or the
per-split ``FER2013{Train,Valid,Test}/label.csv`` files (joined by FER+ image
name, which needs the names stored in fer2013.npz). Eight classes in the vote
column order; splits train / validation / test = Training / PublicTest /
PrivateTest, plus the RAN occlusion and pose lists when present.

Label modes follow ``FERPlusReader._process_data`` in microsoft/FERPlus
(src/ferplus.py): votes of 1 or less are zeroed as outliers, then

  * ``majority``: keep an image only if its top emotion has more than half of
    the remaining votes; target = that emotion;
  * ``probability`` / ``crossentropy``: take the top-voted emotions (ties
    together) until they hold 75% of the votes or three were taken, stopping at
    unknown/NF; drop the image if they hold half the votes or less or more than
    three were taken; target = their vote distribution. The two modes differ
    only in training (probability samples a one-hot target from it);
  * ``multi_target``: target = the emotions holding at least 30% of the votes,
    dropped if they hold half the votes or less;
  * ``plurality`` (not in the FER+ code; a reconstruction for the common
    "argmax" protocol): target = the most-voted class, first on ties.

In every mode an image whose target peaks at unknown or NF is dropped, and the
target is renormalised over the 8 emotions; it is stored as ``soft_label`` and
its argmax as ``label``. As in the FER+ training script, validation and test
use ``majority`` whatever the training mode (``eval_label_mode`` changes that).
Images of the RAN lists keep the list's label (one-hot ``soft_label``). The raw
votes are always kept as ``votes``.
"""
import csv
import dataclasses
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds

from fer_jax.data import classes
from fer_jax.data.tfds_builders import common
from fer_jax.data.tfds_builders import fer2013
from fer_jax.data.tfds_builders import ran_lists

LABEL_MODES = ("majority", "plurality", "probability", "crossentropy",
               "multi_target")
SPLITS = ("train", "validation", "test")
_NUM_EMOTIONS = len(classes.FERPLUS8)
_LABEL_CSVS = ("FER2013Train/label.csv", "FER2013Valid/label.csv",
               "FER2013Test/label.csv")

CITATION = """@inproceedings{barsoum2016training,
  title={Training deep networks for facial expression recognition with crowd-sourced label distribution},
  author={Barsoum, Emad and Zhang, Cha and Canton Ferrer, Cristian and Zhang, Zhengyou},
  booktitle={ICMI}, year={2016}}"""

LAYOUTS = f"""FER2013 pixels, one of (anywhere up to four folders deep in manual_dir):
  fer2013.csv or fer2013.npz
and the FER+ votes, one of:
  fer2013new.csv   (microsoft/FERPlus; row-aligned with fer2013.csv)
  FER2013Train/label.csv, FER2013Valid/label.csv, FER2013Test/label.csv
                   (joined by image name; needs fer2013.npz, whose rows carry the names)
Optionally the RAN lists jianfei_occlusion_list.txt, pose_30_ferplus_list.txt,
pose_45_ferplus_list.txt (kaiwang960112/Challenge-condition-FER-dataset).
Label modes: {', '.join(LABEL_MODES)}."""


def ferplus_target(votes, mode: str) -> np.ndarray | None:
  """The 8-emotion target of one image's 10 vote counts, or None if FER+ drops it."""
  if mode not in LABEL_MODES:
    raise ValueError(f"label mode {mode!r} is not one of {LABEL_MODES}")
  raw = [float(v) for v in votes]
  size = len(raw)
  unknown = [0.0] * size
  unknown[-2] = 1.0
  raw = [0.0 if v < 1.0 + sys.float_info.epsilon else v for v in raw]
  total = sum(raw)
  emotion = [0.0] * size
  if mode == "majority":
    top = max(raw)
    if top > 0.5 * total:
      emotion[int(np.argmax(raw))] = top
    else:
      emotion = unknown
  elif mode == "plurality":
    emotion = unknown if total == 0 else raw
    emotion = [float(i == int(np.argmax(emotion))) for i in range(size)]
  elif mode in ("probability", "crossentropy"):
    taken, count, valid = 0.0, 0, True
    while taken < 0.75 * total and count < 3 and valid:
      top = max(raw)
      for i in range(size):
        if raw[i] == top:
          emotion[i] = top
          raw[i] = 0.0
          taken += emotion[i]
          count += 1
          if i >= _NUM_EMOTIONS:  # unknown or NF ties with the current peak
            valid = False
            if sum(emotion) > top:  # emotions were taken before it
              emotion[i] = 0.0
              count -= 1
            break
    if sum(emotion) <= 0.5 * total or count > 3:
      emotion = unknown
  else:  # multi_target
    emotion = [v if v >= 0.3 * total else 0.0 for v in raw]
    if sum(emotion) <= 0.5 * total:
      emotion = unknown
  if int(np.argmax(emotion)) >= _NUM_EMOTIONS:
    return None
  target = np.array(emotion[:_NUM_EMOTIONS], np.float32)
  return target / target.sum()


@dataclasses.dataclass(eq=False)
class FerplusConfig(tfds.core.BuilderConfig):
  """``label_mode`` for train, ``eval_label_mode`` for validation and test."""
  label_mode: str = "majority"
  eval_label_mode: str = "majority"


def make_config(label_mode: str = "majority",
                eval_label_mode: str = "majority") -> FerplusConfig:
  for mode in (label_mode, eval_label_mode):
    if mode not in LABEL_MODES:
      raise ValueError(f"label mode {mode!r} is not one of {LABEL_MODES}")
  name = label_mode if eval_label_mode == "majority" else (
      f"{label_mode}_eval_{eval_label_mode}")
  return FerplusConfig(name=name, label_mode=label_mode,
                       eval_label_mode=eval_label_mode,
                       description=f"train: {label_mode}; validation/test: "
                       f"{eval_label_mode}")


def _read_label_csvs(paths: list[pathlib.Path]) -> dict[str, np.ndarray]:
  """Image name -> 10 votes from the FER+ ``label.csv`` files (``name,"(box)",votes``)."""
  votes = {}
  for path in paths:
    with open(path, newline="") as f:
      for line, row in enumerate(csv.reader(f), start=1):
        try:
          counts = np.array([int(c) for c in row[2:]], np.int32)
        except ValueError:
          counts = np.zeros(0, np.int32)
        if counts.size != fer2013.NUM_VOTES or counts.min() < 0:
          raise common.DataError(
              f"{common.location(path, line)}: expected 'ferNNNNNNN.png,"
              f"\"(x, y, w, h)\",<{fer2013.NUM_VOTES} vote counts>', got {row}")
        votes[row[0].strip()] = counts
  return votes


def read_votes(manual_dir: pathlib.Path) -> fer2013.Fer2013Table:
  """The FER2013 table of ``manual_dir`` with FER+ names and votes filled in."""
  table = fer2013.read_table(manual_dir)
  if not (table.csv_row >= 0).any():
    raise FileNotFoundError(
        f"{manual_dir}: FER+ needs fer2013.csv or fer2013.npz pixels, whose rows "
        f"can be joined with the votes (Kaggle image folders cannot); expected:\n{LAYOUTS}")
  new_csv = common.find(manual_dir, "fer2013new.csv")
  label_csvs = [common.find(manual_dir, p) for p in _LABEL_CSVS]
  if new_csv is not None:
    fer2013.attach_ferplus_csv(table, new_csv)
  elif all(label_csvs):
    named = np.flatnonzero(table.names != "")
    if not named.size:
      raise FileNotFoundError(
          f"{manual_dir}: joining label.csv files needs the FER+ image names of "
          f"fer2013.npz; with fer2013.csv use fer2013new.csv. Expected:\n{LAYOUTS}")
    by_name = _read_label_csvs(label_csvs)
    missing = [table.names[i] for i in named if table.names[i] not in by_name]
    if missing:
      raise common.DataError(f"{label_csvs[0].parent.parent}: no label.csv row for "
                             f"{len(missing)} images, e.g. {missing[:3]}")
    table.votes[named] = np.stack([by_name[table.names[i]] for i in named])
  else:
    raise FileNotFoundError(f"no FER+ votes in {manual_dir}; expected:\n{LAYOUTS}")
  return table


class Ferplus(tfds.core.GeneratorBasedBuilder):
  """FER+ with one builder config per label mode."""
  name = "ferplus"
  VERSION = common.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUTS
  BUILDER_CONFIGS = [make_config(mode) for mode in LABEL_MODES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("FER+: FER2013 images with 10 crowd votes each, 8 classes; "
                     "'index' is the fer2013.csv row, 'votes' the raw counts "
                     f"({', '.join(fer2013.VOTE_COLUMNS)})."),
        features=tfds.features.FeaturesDict({
            "image": common.image_feature(fer2013.IMAGE_SHAPE, "raw"),
            "label": tfds.features.ClassLabel(names=classes.FERPLUS8),
            "soft_label": tfds.features.Tensor(shape=(_NUM_EMOTIONS,),
                                               dtype=np.float32),
            "votes": tfds.features.Tensor(shape=(fer2013.NUM_VOTES,),
                                          dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/microsoft/FERPlus",
        citation=CITATION,
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    table = read_votes(manual_dir)
    config = self.builder_config
    splits = {}
    for usage, split in enumerate(SPLITS):
      mode = config.label_mode if split == "train" else config.eval_label_mode
      rows = np.flatnonzero((table.usage == usage) & (table.names != ""))
      targets = ((table.keys[i], i, ferplus_target(table.votes[i], mode))
                 for i in rows)
      splits[split] = self._generate_examples(
          table, [entry for entry in targets if entry[2] is not None])
    # A name on two rows was rendered from the later one; the lists mean that.
    test_rows = {pathlib.Path(table.names[i]).stem: i for i in
                 np.flatnonzero((table.usage == 2) & (table.names != ""))}
    one_hot = np.eye(_NUM_EMOTIONS, dtype=np.float32)
    for split, path in ran_lists.find_lists(manual_dir, ran_lists.FERPLUS).items():
      entries = ran_lists.match(path, ran_lists.FERPLUS[split], test_rows,
                                _NUM_EMOTIONS)
      splits[split] = self._generate_examples(
          table, [(line, i, one_hot[label]) for line, i, label in entries])
    return splits

  def _generate_examples(self, table: fer2013.Fer2013Table, entries):
    for key, i, target in entries:
      yield key, {"image": table.pixels[i][..., None],
                  "label": int(np.argmax(target)), "soft_label": target,
                  "votes": table.votes[i], "index": table.csv_row[i]}
