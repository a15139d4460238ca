"""The real-dataset TFDS builders, loaders, prepare CLI and streaming pipeline.

Fixture downloads (tests/fixtures.py) are written in the public layouts; the
expected records are derived here from what was written, and FER+ label rules
from hand-worked vote examples and an independent numpy majority count.
"""
import csv
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fer_jax.data import DATASETS, ArraySplit, as_arrays, classes, prepare, real
from fer_jax.data import streaming
from fer_jax.data.tfds_builders import common
from fer_jax.data.tfds_builders import ferplus
from fer_jax.data.tfds_builders import ran_lists
import fixtures  # tests/fixtures.py, on the path as a sibling test module


def load(name, manual_dir, data_dir, **fields):
  cfg = real.default_config(name)
  cfg.manual_dir = str(manual_dir) if manual_dir else ""
  cfg.data_dir = str(data_dir)
  cfg.update(fields)
  return DATASETS.get(name)(cfg)


def by_index(split) -> list[dict]:
  """All records of a split, ordered by their ``index`` (TFDS stores them key-shuffled)."""
  records = [split[i] for i in range(len(split))]
  return sorted(records, key=lambda r: int(r["index"]))


# ----------------------------------------------------------------- FER2013

def test_fer2013_csv_layout_gives_every_row_with_contract_dtypes(tmp_path):
  rows = fixtures.fer2013_rows()
  fixtures.write_fer2013_csv(tmp_path / "download", rows)
  dataset = load("fer2013", tmp_path / "download", tmp_path / "tfds")
  assert dataset.class_names == classes.FER7
  assert {s: len(v) for s, v in dataset.splits.items()} == {
      "train": 6, "public_test": 3, "private_test": 3}
  for usage, split in enumerate(("train", "public_test", "private_test")):
    records = by_index(dataset.split(split))
    assert [int(r["index"]) for r in records] == np.flatnonzero(rows.usage == usage).tolist()
    for r in records:
      np.testing.assert_array_equal(r["image"][..., 0], rows.pixels[r["index"]])
      assert r["label"] == rows.emotion[r["index"]]
      assert r["image"].dtype == np.uint8 and r["image"].shape == (48, 48, 1)
      assert r["label"].dtype == np.int32 and r["index"].dtype == np.int64
      np.testing.assert_array_equal(r["ferplus_votes"], -1)


def test_fer2013_csv_npz_and_kaggle_layouts_give_the_same_records(tmp_path):
  rows = fixtures.fer2013_rows()
  fixtures.write_fer2013_csv(tmp_path / "csv", rows)
  fixtures.write_fer2013_npz(tmp_path / "npz", rows)
  fixtures.write_kaggle(tmp_path / "kaggle", rows)
  loaded = {layout: load("fer2013", tmp_path / layout, tmp_path / f"tfds_{layout}")
            for layout in ("csv", "npz", "kaggle")}
  for split in ("train", "public_test", "private_test"):
    from_csv = by_index(loaded["csv"].split(split))
    from_npz = by_index(loaded["npz"].split(split))
    for a, b in zip(from_csv, from_npz, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      assert a["label"] == b["label"] and a["index"] == b["index"]
    # Kaggle JPEGs carry no csv row: pair each with the closest lossless image.
    from_kaggle = [loaded["kaggle"].split(split)[i]
                   for i in range(len(loaded["kaggle"].split(split)))]
    assert len(from_kaggle) == len(from_csv)
    assert all(r["index"] == -1 for r in from_kaggle)
    lossless = np.stack([r["image"] for r in from_csv]).astype(np.float64)
    for r in from_kaggle:
      rms = np.sqrt(((lossless - r["image"]) ** 2).mean(axis=(1, 2, 3)))
      closest = int(np.argmin(rms))
      assert rms[closest] < 3.0
      assert r["label"] == from_csv[closest]["label"]


def test_fer2013_takes_ferplus_votes_row_aligned(tmp_path):
  rows = fixtures.fer2013_rows()
  votes = np.arange(12 * 10).reshape(12, 10) % 11
  fixtures.write_fer2013_csv(tmp_path / "download", rows)
  fixtures.write_ferplus_csv(tmp_path / "download", rows.usage,
                             [f"fer{i:07d}.png" for i in range(12)], votes)
  dataset = load("fer2013", tmp_path / "download", tmp_path / "tfds")
  for split in dataset.splits.values():
    for r in by_index(split):
      np.testing.assert_array_equal(r["ferplus_votes"], votes[r["index"]])


# Verified counts of shared/data/README.md (usage x FER2013 class).
README_COUNTS = {
    "train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "public_test": [467, 56, 496, 895, 653, 415, 607],
    "private_test": [491, 55, 528, 879, 594, 416, 626],
}


def test_fer2013_shared_data_matches_the_published_counts(shared_data, tmp_path):
  dataset = load("fer2013", shared_data, tmp_path / "tfds")
  for split, counts in README_COUNTS.items():
    labels = as_arrays(dataset.split(split))["label"]
    assert len(labels) == sum(counts)
    np.testing.assert_array_equal(np.bincount(labels, minlength=7), counts)


# -------------------------------------------------------------------- FER+

_NEUTRAL = [1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("votes, expected", [
    # FERPlus README row 0: outlier 1 vote removed -> 4,3,2 of 9.
    ([4, 0, 0, 1, 3, 2, 0, 0, 0, 0],
     {"majority": None, "plurality": _NEUTRAL,
      "crossentropy": [4 / 7, 0, 0, 0, 3 / 7, 0, 0, 0],
      "multi_target": [4 / 7, 0, 0, 0, 3 / 7, 0, 0, 0]}),
    ([6, 0, 1, 1, 0, 0, 0, 0, 2, 0],
     {"majority": _NEUTRAL, "plurality": _NEUTRAL, "crossentropy": _NEUTRAL,
      "multi_target": _NEUTRAL}),
    # Unknown ties with two emotions: it is removed, the emotions kept.
    ([3, 3, 0, 0, 0, 0, 0, 0, 3, 1],
     {"majority": None, "plurality": _NEUTRAL,
      "crossentropy": [0.5, 0.5, 0, 0, 0, 0, 0, 0],
      "multi_target": [0.5, 0.5, 0, 0, 0, 0, 0, 0]}),
    # Four tied emotions: more than three taken -> dropped.
    ([2, 2, 2, 2, 0, 0, 0, 0, 2, 0],
     {"majority": None, "plurality": _NEUTRAL, "crossentropy": None,
      "multi_target": None}),
    ([5, 0, 2, 0, 0, 0, 2, 0, 0, 1],
     {"majority": _NEUTRAL, "plurality": _NEUTRAL,
      "crossentropy": [5 / 9, 0, 2 / 9, 0, 0, 0, 2 / 9, 0],
      "multi_target": _NEUTRAL}),
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
     {"majority": None, "plurality": None, "crossentropy": None,
      "multi_target": None}),
    # Every vote is a lone outlier: nothing is left.
    ([1] * 10,
     {"majority": None, "plurality": None, "crossentropy": None,
      "multi_target": None}),
])
def test_ferplus_label_modes_on_hand_worked_votes(votes, expected):
  expected["probability"] = expected["crossentropy"]
  for mode, target in expected.items():
    got = ferplus.ferplus_target(votes, mode)
    if target is None:
      assert got is None, mode
    else:
      np.testing.assert_allclose(got, target, rtol=1e-6, err_msg=mode)


# Twelve FER2013 rows (6 train, 3 validation, 3 test); row 2 has no FER+ image.
FERPLUS_VOTES = np.array([
    [4, 0, 0, 1, 3, 2, 0, 0, 0, 0], [6, 0, 1, 1, 0, 0, 0, 0, 2, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], [3, 3, 0, 0, 0, 0, 0, 0, 3, 1],
    [2, 2, 2, 2, 0, 0, 0, 0, 2, 0], [5, 0, 2, 0, 0, 0, 2, 0, 0, 1],
    [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], [4, 0, 0, 1, 3, 2, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 8, 2, 0], [0, 0, 9, 0, 0, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 7, 0, 3, 0]])
# FER+ names skip unrendered rows, so a name's number is not its row.
FERPLUS_NAMES = ["fer0000000.png", "fer0000001.png", ""] + [
    f"fer{i:07d}.png" for i in range(2, 11)]
# Expected (csv row -> soft label) per split, worked out by hand from the votes.
CROSSENTROPY_TRAIN = {0: [4 / 7, 0, 0, 0, 3 / 7, 0, 0, 0], 1: _NEUTRAL,
                      3: [0.5, 0.5, 0, 0, 0, 0, 0, 0],
                      5: [5 / 9, 0, 2 / 9, 0, 0, 0, 2 / 9, 0]}
MAJORITY_EVAL = {"validation": {6: 1, 8: 7}, "test": {9: 2, 11: 6}}


def write_ferplus_download(folder: pathlib.Path, votes_as="new_csv"):
  rows = fixtures.fer2013_rows()
  if votes_as == "new_csv":
    fixtures.write_fer2013_csv(folder, rows)
    fixtures.write_ferplus_csv(folder / "FERPlus", rows.usage, FERPLUS_NAMES,
                               FERPLUS_VOTES)
  else:
    fixtures.write_fer2013_npz(folder, rows, FERPLUS_NAMES, FERPLUS_VOTES)
    fixtures.write_ferplus_label_csvs(folder / "FERPlus" / "data", rows.usage,
                                      FERPLUS_NAMES, FERPLUS_VOTES)
  fixtures.write_ferplus_ran_lists(
      folder / "lists", occlusion=[(2, "fer0000008"), (0, "fer0000009")],
      pose30=[(6, "fer0000010")], pose45=[(2, "fer0000008"), (6, "fer0000010")])
  return rows


def test_ferplus_crossentropy_train_and_majority_eval(tmp_path):
  rows = write_ferplus_download(tmp_path / "download")
  dataset = load("ferplus", tmp_path / "download", tmp_path / "tfds",
                 label_mode="crossentropy")
  assert dataset.class_names == classes.FERPLUS8
  train = {int(r["index"]): r for r in by_index(dataset.split("train"))}
  assert sorted(train) == sorted(CROSSENTROPY_TRAIN)
  for row, target in CROSSENTROPY_TRAIN.items():
    np.testing.assert_allclose(train[row]["soft_label"], target, rtol=1e-6)
    assert train[row]["label"] == int(np.argmax(target))
    np.testing.assert_array_equal(train[row]["votes"], FERPLUS_VOTES[row])
    np.testing.assert_array_equal(train[row]["image"][..., 0], rows.pixels[row])
  for split, labels in MAJORITY_EVAL.items():
    got = {int(r["index"]): int(r["label"]) for r in by_index(dataset.split(split))}
    assert got == labels


def test_ferplus_modes_keep_the_hand_worked_train_rows(tmp_path):
  write_ferplus_download(tmp_path / "download")
  expected = {"majority": [1, 5], "plurality": [0, 1, 3, 4, 5],
              "multi_target": [0, 1, 3, 5]}
  for mode, kept in expected.items():
    dataset = load("ferplus", tmp_path / "download", tmp_path / "tfds",
                   label_mode=mode)
    assert [int(r["index"]) for r in by_index(dataset.split("train"))] == kept


def test_ferplus_label_csv_join_equals_new_csv_join(tmp_path):
  write_ferplus_download(tmp_path / "new_csv", "new_csv")
  write_ferplus_download(tmp_path / "label_csv", "label_csv")
  a = load("ferplus", tmp_path / "new_csv", tmp_path / "tfds_a")
  b = load("ferplus", tmp_path / "label_csv", tmp_path / "tfds_b")
  assert set(a.splits) == set(b.splits)
  for split in a.splits:
    for ra, rb in zip(by_index(a.split(split)), by_index(b.split(split)), strict=True):
      for key in ("image", "label", "soft_label", "votes", "index"):
        np.testing.assert_array_equal(ra[key], rb[key])


def test_ferplus_ran_lists_keep_list_labels(tmp_path):
  write_ferplus_download(tmp_path / "download")
  dataset = load("ferplus", tmp_path / "download", tmp_path / "tfds")
  got = {split: sorted((int(r["index"]), int(r["label"]))
                       for r in by_index(dataset.split(split)))
         for split in ("test_occlusion", "test_pose30", "test_pose45")}
  # fer0000008/9/10 are csv rows 9/10/11; row 10 is in the list though majority drops it.
  assert got == {"test_occlusion": [(9, 2), (10, 0)], "test_pose30": [(11, 6)],
                 "test_pose45": [(9, 2), (11, 6)]}


def numpy_majority_counts(votes: np.ndarray) -> np.ndarray:
  """Per-class counts of FER+ majority labels, straight from the vote matrix."""
  kept_votes = np.where(votes <= 1, 0, votes).astype(np.float64)
  top = kept_votes.max(axis=1)
  winner = kept_votes.argmax(axis=1)
  keep = (top > 0.5 * kept_votes.sum(axis=1)) & (winner < 8)
  return np.bincount(winner[keep], minlength=8)


def test_ferplus_shared_data_majority_sizes_and_ran_lists(shared_data, tmp_path):
  with open(shared_data / "ferplus" / "fer2013new.csv", newline="") as f:
    table = list(csv.reader(f))[1:]
  usage = np.array([("Training", "PublicTest", "PrivateTest").index(r[0]) for r in table])
  named = np.array([r[1] != "" for r in table])
  votes = np.array([[int(v) for v in r[2:]] for r in table])
  with np.load(shared_data / "fer2013" / "fer2013.npz") as npz:
    # The npz holds pixels at their csv row only where row_known.
    rendered = named & npz["row_known"]
  dataset = load("ferplus", shared_data, tmp_path / "tfds")
  for u, split in enumerate(("train", "validation", "test")):
    expected = numpy_majority_counts(votes[rendered & (usage == u)])
    assert len(dataset.split(split)) == expected.sum()
    print(f"FER+ majority {split}: {expected.sum()}")
    if split != "train":  # reading the 25k train records would double the time
      labels = as_arrays(dataset.split(split))["label"]
      np.testing.assert_array_equal(np.bincount(labels, minlength=8), expected)
  test_rows = set(np.flatnonzero(usage == 2))
  for split, size in (("test_occlusion", 605), ("test_pose30", 1170),
                      ("test_pose45", 633)):
    indices = as_arrays(dataset.split(split))["index"]
    assert len(indices) == size
    assert set(indices.tolist()) <= test_rows


def test_ran_list_formats_match_the_published_lists(shared_data):
  folder = shared_data / "challenge_condition_fer"
  expected = [(ran_lists.FERPLUS, "FERplus_dir", (605, 1170, 633), 8),
              (ran_lists.RAFDB, "RAF_DB_dir", (735, 1247, 558), 7),
              (ran_lists.AFFECTNET, "AffectNet_dir", (683, 1949, 985), 8)]
  for lists, sub, sizes, num_classes in expected:
    for (split, ran_list), size in zip(lists.items(), sizes, strict=True):
      entries = ran_list.read(folder / sub / ran_list.file_name)
      assert len(entries) == size, split
      assert all(0 <= label < num_classes for _, _, label in entries)


# ------------------------------------------------------------------ RAF-DB

RAF_TRAIN = [1, 2, 3, 4, 5, 6, 7, 4]
RAF_TEST = [1, 2, 3, 4, 5]


def write_rafdb_download(folder: pathlib.Path):
  images = fixtures.write_rafdb(folder / "RAF-DB", RAF_TRAIN, RAF_TEST)
  fixtures.write_rafdb_ran_lists(
      folder / "RAN", occlusion=[(0, "test_0001"), (3, "test_0004"), (3, "test_0004")],
      pose30=[(1, "test_0002")], pose45=[(4, "test_0005")])
  return images


def test_rafdb_official_layout_and_ran_lists(tmp_path):
  images = write_rafdb_download(tmp_path / "download")
  dataset = load("rafdb", tmp_path / "download", tmp_path / "tfds")
  assert dataset.class_names == classes.RAFDB7
  for split, labels in (("train", RAF_TRAIN), ("test", RAF_TEST)):
    records = by_index(dataset.split(split))
    assert [int(r["index"]) for r in records] == list(range(1, len(labels) + 1))
    assert [int(r["label"]) for r in records] == [label - 1 for label in labels]
    for r in records:
      stem = f"{split}_{int(r['index']):0{5 if split == 'train' else 4}d}"
      error = np.abs(r["image"].astype(int) - images[stem]).mean()
      assert r["image"].shape == (100, 100, 3) and error < 3
  got = {split: sorted((int(r["index"]), int(r["label"]))
                       for r in by_index(dataset.split(split)))
         for split in ("test_occlusion", "test_pose30", "test_pose45")}
  assert got == {"test_occlusion": [(1, 0), (4, 3), (4, 3)],
                 "test_pose30": [(2, 1)], "test_pose45": [(5, 4)]}


# --------------------------------------------------------------- AffectNet

# (expression, valence, arousal, kept by EmoNet's cleaned filter), by hand.
CLEANED_CASES = [
    (0, 0.1, 0.1, True), (0, 0.3, 0.0, False), (1, 0.5, 0.1, True),
    (1, -0.5, 0.1, False), (2, -0.5, 0.0, True), (2, 0.1, 0.1, False),
    (3, 0.0, 0.5, True), (3, 0.0, -0.5, False), (4, -0.3, 0.2, True),
    (4, 0.1, 0.5, False), (5, -0.4, 0.1, True), (5, -0.25, 0.0, False),
    (6, -0.2, 0.5, True), (6, 0.5, -0.1, False), (7, -0.3, 0.1, True),
    (7, 0.3, 0.1, False), (9, -2.0, -2.0, False)]


def write_affectnet_download(folder: pathlib.Path):
  train = [fixtures.AffectnetRow(e, 0.5, -0.5) for e in range(8)]
  train[3].box = (-10, 8, 20, 20)  # half outside the image: padded black
  train += [fixtures.AffectnetRow(e, -2.0, -2.0) for e in (8, 9, 10)]
  validation = [fixtures.AffectnetRow(e, v, a) for e, v, a, _ in CLEANED_CASES]
  stems = fixtures.write_affectnet(folder, train, validation)
  val = stems["validation"]
  fixtures.write_affectnet_ran_lists(
      folder / "RAN", occlusion=[(1, val[2]), (7, val[14])], pose30=[(2, val[4])],
      pose45=[(3, val[6]), (3, val[6])])
  return train, validation


def test_affectnet_classes_crops_valence_arousal_and_lists(tmp_path):
  train, validation = write_affectnet_download(tmp_path / "download")
  dataset = load("affectnet", tmp_path / "download", tmp_path / "tfds", image_size=16)
  assert dataset.class_names == classes.AFFECTNET8
  records = by_index(dataset.split("train"))
  assert [int(r["index"]) for r in records] == list(range(8))  # 8..10 dropped
  for r in records:
    row = train[int(r["index"])]
    assert r["label"] == row.expression
    assert r["valence"] == np.float32(row.valence) and r["valence"].dtype == np.float32
    assert r["arousal"] == np.float32(row.arousal)
    assert r["image"].shape == (16, 16, 3)
    if r["index"] != 3:  # the square crop is exactly the grey face box
      np.testing.assert_allclose(r["image"][4:12, 4:12], 200, atol=4)
  padded = records[3]["image"].astype(int)
  assert padded[:, :6].max() < 20 and abs(padded[4:12, 10:].mean() - 200) < 4
  val = by_index(dataset.split("validation"))
  assert [int(r["index"]) for r in val] == list(range(16))
  lists = {split: sorted((int(r["index"]), int(r["label"]))
                         for r in by_index(dataset.split(split)))
           for split in ("test_occlusion", "test_pose30", "test_pose45")}
  assert lists == {"test_occlusion": [(2, 1), (14, 7)], "test_pose30": [(4, 2)],
                   "test_pose45": [(6, 3), (6, 3)]}


def test_affectnet_cleaned_filter_and_seven_classes(tmp_path):
  write_affectnet_download(tmp_path / "download")
  cleaned = load("affectnet", tmp_path / "download", tmp_path / "tfds",
                 image_size=16, cleaned=True)
  kept = [i for i, case in enumerate(CLEANED_CASES) if case[3]]
  assert [int(r["index"]) for r in by_index(cleaned.split("validation"))] == kept
  seven = load("affectnet", tmp_path / "download", tmp_path / "tfds",
               image_size=16, num_classes=7)
  assert seven.class_names == classes.AFFECTNET8[:7]
  assert [int(r["index"]) for r in by_index(seven.split("train"))] == list(range(7))
  assert len(seven.split("test_occlusion")) == 1  # the contempt entry is dropped


# ------------------------------------------------------------ image folder

def test_image_folder_class_names_from_folders_and_maps(tmp_path):
  layout = {"angry": 2, "happy": 3, "neutral": 1}
  fixtures.write_image_folder(tmp_path / "jaffe", layout)
  plain = load("image_folder", tmp_path / "jaffe", tmp_path / "tfds",
               dataset_name="jaffe", image_size=12, grayscale=True)
  assert plain.class_names == ("angry", "happy", "neutral")
  records = as_arrays(plain.split("train"))
  assert records["image"].shape == (6, 12, 12, 1)
  np.testing.assert_array_equal(np.bincount(records["label"]), [2, 3, 1])
  fixtures.write_json(tmp_path / "map.json",
                      {"neutral": "neutral", "happy": "happiness", "angry": "anger"})
  mapped = load("image_folder", tmp_path / "jaffe", tmp_path / "tfds",
                dataset_name="jaffe_json", class_map=str(tmp_path / "map.json"),
                image_size=12)
  assert mapped.class_names == ("neutral", "happiness", "anger")
  np.testing.assert_array_equal(
      np.bincount(as_arrays(mapped.split("train"))["label"]), [1, 3, 2])
  (tmp_path / "jaffe" / "classes.txt").write_text("happy\nangry\nneutral\n")
  from_txt = load("image_folder", tmp_path / "jaffe", tmp_path / "tfds",
                  dataset_name="jaffe_txt", class_map="classes.txt", image_size=12,
                  image_encoding="raw")
  assert from_txt.class_names == ("happy", "angry", "neutral")
  images = as_arrays(from_txt.split("train"))
  assert images["image"].shape == (6, 12, 12, 3)
  # Lossless storage of uniform fixture images: each keeps its exact grey level.
  assert sorted(np.unique(images["image"]).tolist()) == [0, 1, 30, 31, 32, 60]


def test_image_folder_split_folders_and_stale_classes(tmp_path):
  fixtures.write_image_folder(tmp_path / "ck", {"anger": 2, "fear": 1}, split="train")
  fixtures.write_image_folder(tmp_path / "ck", {"anger": 1, "fear": 1}, split="test")
  dataset = load("image_folder", tmp_path / "ck", tmp_path / "tfds",
                 dataset_name="ck", image_size=8)
  assert {s: len(v) for s, v in dataset.splits.items()} == {"train": 3, "test": 2}
  fixtures.write_image_folder(tmp_path / "ck", {"sad": 1}, split="train")
  with pytest.raises(ValueError, match="now gives"):
    load("image_folder", tmp_path / "ck", tmp_path / "tfds", dataset_name="ck",
         image_size=8)


# ---------------------------------------------------------------- bad data

def _fer_csv_with(tmp_path, line: int, column: str, value: str):
  fixtures.write_fer2013_csv_with(tmp_path / "download", line, column, value)


def _kaggle_with(tmp_path, content):
  fixtures.write_kaggle(tmp_path / "download", fixtures.fer2013_rows())
  content(tmp_path / "download" / "train" / "angry" / "Training_10000.jpg")


def _raf_with(tmp_path, label_line=None, small_test_image=False):
  write_rafdb_download(tmp_path / "download")
  basic = tmp_path / "download" / "RAF-DB" / "basic"
  if label_line:
    path = basic / "EmoLabel" / "list_patition_label.txt"
    lines = path.read_text().splitlines()
    lines[1] = label_line
    path.write_text("\n".join(lines) + "\n")
  if small_test_image:
    fixtures.Image.fromarray(fixtures.rafdb_image(0, (90, 90))).save(
        basic / "Image" / "aligned" / "test_0003_aligned.jpg")


def _replace_in(path: pathlib.Path, line: int, column: int, value: str):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  rows[line - 1][column] = value
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)


BAD_DATA = {
    "csv_pixel_count": (
        "fer2013", lambda p: _fer_csv_with(p, 3, "pixels", "1 2 3"),
        r"fer2013\.csv, line 3: 'pixels' must hold 2304 integers"),
    "csv_unknown_label": (
        "fer2013", lambda p: _fer_csv_with(p, 2, "emotion", "9"),
        r"fer2013\.csv, line 2: unknown label 9"),
    "undecodable_image": (
        "fer2013", lambda p: _kaggle_with(p, lambda f: f.write_bytes(b"not a jpeg")),
        r"Training_10000\.jpg.*cannot decode"),
    "wrong_image_size": (
        "fer2013", lambda p: _kaggle_with(
            p, lambda f: fixtures.Image.new("L", (40, 40)).save(f)),
        r"Training_10000\.jpg: image is 40x40 .*expected 48x48"),
    "raf_unknown_label": (
        "rafdb", lambda p: _raf_with(p, label_line="train_00002.jpg 8"),
        r"list_patition_label\.txt, line 2: unknown label 8"),
    "raf_wrong_size_in_test": (
        "rafdb", lambda p: _raf_with(p, small_test_image=True),
        r"list_patition_label\.txt, line 11 .*test_0003_aligned\.jpg.*expected 100x100"),
    "affectnet_unknown_label": (
        "affectnet", lambda p: (write_affectnet_download(p / "download"),
                                _replace_in(p / "download" / "Manually_Annotated_file_lists"
                                            / "training.csv", 3, 6, "12")),
        r"training\.csv, line 3: unknown label 12"),
    "ran_list_unknown_image": (
        "ferplus", lambda p: (write_ferplus_download(p / "download"), fixtures.write_lines(
            p / "download" / "lists" / "pose_30_ferplus_list.txt",
            ["6/fer0000010.jpg", "1/fer0000001.jpg"])),
        r"pose_30_ferplus_list\.txt, line 2: image 'fer0000001' is not among the test"),
    "label_csv_row": (
        "ferplus", lambda p: (write_ferplus_download(p / "download", "label_csv"),
                              fixtures.write_lines(p / "download" / "FERPlus" / "data" /
                                                   "FER2013Valid" / "label.csv",
                                                   ['fer0000005.png,"(0, 0, 48, 48)",1,2'])),
        r"FER2013Valid/label\.csv, line 1: expected"),
    "raf_corrupt_image": (
        "rafdb", lambda p: (write_rafdb_download(p / "download"), _corrupt(
            p / "download" / "RAF-DB" / "basic" / "Image" / "aligned" / "train_00003_aligned.jpg")),
        r"list_patition_label\.txt, line 3: cannot decode image .*train_00003_aligned\.jpg"),
    "affectnet_corrupt_image": (
        "affectnet", lambda p: (write_affectnet_download(p / "download"), _corrupt(
            next((p / "download" / "Manually_Annotated_Images").rglob("a002*.jpg")))),
        r"training\.csv, line 4: cannot decode image .*a002.*\.jpg"),
    "empty_manual_dir": (
        "fer2013", lambda p: (p / "download").mkdir(), r"download is empty"),
    "missing_manual_dir": ("fer2013", lambda p: None, r"download does not exist"),
}


def _corrupt(path: pathlib.Path) -> None:
  """A truncated download: the image's first half."""
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_names_file_and_row_and_leaves_nothing(tmp_path, case):
  name, make, message = BAD_DATA[case]
  make(tmp_path)
  with pytest.raises((common.DataError, FileNotFoundError), match=message):
    load(name, tmp_path / "download", tmp_path / "tfds")
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("case,extra_args,named", [
    ("csv_pixel_count", (), r"fer2013\.csv, line 3: 'pixels' must hold 2304 integers"),
    ("missing_manual_dir", (),
     r"download does not exist; the expected layouts: docs/datasets\.md$"),
    ("csv_unknown_label", ("--config=lable_mode=majority",), r"'lable_mode' is not a field"),
])
def test_prepare_cli_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys, case,
                                                              extra_args, named):
  name, make, _ = BAD_DATA[case]
  make(tmp_path)
  with pytest.raises(SystemExit) as exited:
    prepare.run([name, f"--manual_dir={tmp_path / 'download'}",
                 f"--data_dir={tmp_path / 'tfds'}", *extra_args])
  assert exited.value.code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: ") and re.search(named, line), line
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda root: _corrupt(root / "happy" / "img1.png"), r"happy/img1\.png.*cannot decode"),
    (lambda root: fixtures.write_image_folder(root, {"bored": 1}),
     r"map\.json: no entry for class folders \['bored'\]"),
])
def test_bad_image_folder_names_the_file_and_a_rebuild_after_the_fix_works(
    tmp_path, damage, message):
  layout = {"angry": 2, "happy": 2}
  fixtures.write_image_folder(tmp_path / "faces", layout)
  fixtures.write_json(tmp_path / "map.json", {"angry": "anger", "happy": "happiness"})
  damage(tmp_path / "faces")
  fields = dict(dataset_name="faces", class_map=str(tmp_path / "map.json"), image_size=8)
  with pytest.raises(common.DataError, match=message):
    load("image_folder", tmp_path / "faces", tmp_path / "tfds", **fields)
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))
  shutil.rmtree(tmp_path / "faces")
  fixtures.write_image_folder(tmp_path / "faces", layout)
  fixed = load("image_folder", tmp_path / "faces", tmp_path / "tfds", **fields)
  assert len(fixed.split("train")) == 4


def test_failed_build_keeps_other_datasets_and_loads_nothing(tmp_path):
  fixtures.write_fer2013_csv(tmp_path / "fer", fixtures.fer2013_rows())
  load("fer2013", tmp_path / "fer", tmp_path / "tfds")
  _raf_with(tmp_path, small_test_image=True)  # fails after the train split is written
  with pytest.raises(common.DataError):
    load("rafdb", tmp_path / "download", tmp_path / "tfds")
  assert sorted(p.name for p in (tmp_path / "tfds").iterdir()) == ["fer2013"]
  with pytest.raises(FileNotFoundError, match="not built"):
    load("rafdb", None, tmp_path / "tfds")
  assert len(load("fer2013", None, tmp_path / "tfds").split("train")) == 6


def test_killed_build_leaves_nothing_loadable_and_rebuilds(tmp_path):
  write_rafdb_download(tmp_path / "download")
  script = textwrap.dedent(f"""
      import os, signal
      from fer_jax.data import real
      from fer_jax.data.tfds_builders import common
      decode, calls = common.decode_image, []
      def decode_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # the train split is written, test is half done
          os.kill(os.getpid(), signal.SIGKILL)
        return decode(*args, **kwargs)
      common.decode_image = decode_then_die
      cfg = real.default_config("rafdb")
      cfg.manual_dir, cfg.data_dir = {str(tmp_path / "download")!r}, {str(tmp_path / "tfds")!r}
      real.load_rafdb(cfg)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == -9, result.stderr.decode()[-2000:]
  # Killed after the train split was written: only TFDS's temporary folder holds it.
  assert list((tmp_path / "tfds" / "rafdb").glob("incomplete.*/rafdb-train.array_record*"))
  with pytest.raises(FileNotFoundError, match="not built"):
    load("rafdb", None, tmp_path / "tfds")
  assert len(load("rafdb", tmp_path / "download", tmp_path / "tfds").split("test")) == 5


# ------------------------------------------------------ loaders and the CLI

def test_class_order_reindexes_labels_and_refuses_to_drop(tmp_path):
  rows = fixtures.fer2013_rows()
  fixtures.write_fer2013_csv(tmp_path / "download", rows)
  dataset = load("fer2013", tmp_path / "download", tmp_path / "tfds",
                 class_order="affectnet8")
  assert dataset.class_names == classes.AFFECTNET8
  fer7_to_affectnet8 = [6, 5, 4, 1, 2, 3, 0]
  for r in by_index(dataset.split("train")):
    assert r["label"] == fer7_to_affectnet8[rows.emotion[r["index"]]]
  write_ferplus_download(tmp_path / "ferplus")
  remapped = load("ferplus", tmp_path / "ferplus", tmp_path / "tfds",
                  class_order="affectnet8", label_mode="crossentropy")
  soft = {int(r["index"]): r["soft_label"] for r in by_index(remapped.split("train"))}
  # FER+ (neutral, happiness, surprise, sadness, anger, ...) -> AffectNet positions.
  np.testing.assert_allclose(soft[0], [4 / 7, 0, 0, 0, 0, 0, 3 / 7, 0], rtol=1e-6)
  with pytest.raises(ValueError, match="contempt"):
    load("ferplus", None, tmp_path / "tfds", class_order="fer7",
         label_mode="crossentropy")


def test_prepare_cli_builds_and_prints_split_sizes(tmp_path, capsys):
  write_ferplus_download(tmp_path / "download")
  sizes = prepare.main(["ferplus", f"--manual_dir={tmp_path / 'download'}",
                        f"--data_dir={tmp_path / 'tfds'}",
                        "--config=label_mode=plurality"])
  assert sizes == {"train": 5, "validation": 2, "test": 2, "test_occlusion": 2,
                   "test_pose30": 1, "test_pose45": 2}
  out = capsys.readouterr().out
  assert "train: 5" in out and "test_occlusion: 2" in out
  assert (tmp_path / "tfds" / "ferplus" / "plurality" / "1.0.0").is_dir()
  with pytest.raises(ValueError, match="not a field of ferplus"):
    prepare.main(["ferplus", "--manual_dir=x", "--config=lable_mode=majority"])


def test_loading_never_imports_tensorflow(tmp_path):
  fixtures.write_fer2013_csv(tmp_path / "download", fixtures.fer2013_rows())
  load("fer2013", tmp_path / "download", tmp_path / "tfds")
  assert "tensorflow" not in sys.modules


# --------------------------------------------------------------- streaming

def toy_split(n=24) -> ArraySplit:
  return ArraySplit({"label": np.arange(n, dtype=np.int32),
                     "image": np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1)})


def test_streaming_epochs_cover_the_split_and_reshuffle():
  it = streaming.batches(toy_split(), global_batch_size=4, seed=3)
  epochs = [np.concatenate([next(it)["label"] for _ in range(6)]) for _ in range(2)]
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(24))
  assert all(epoch.tolist() != list(range(24)) for epoch in epochs)
  assert epochs[0].tolist() != epochs[1].tolist()


def test_streaming_processes_read_disjoint_shares_of_one_order():
  shares = [np.concatenate([b["label"] for b in streaming.batches(
      toy_split(), global_batch_size=8, seed=1, num_epochs=1,
      process_index=p, process_count=4)]) for p in range(4)]
  assert all(len(s) == 6 for s in shares)
  assert sorted(np.concatenate(shares).tolist()) == list(range(24))
  single = np.concatenate([b["label"] for b in streaming.batches(
      toy_split(), global_batch_size=8, seed=1, num_epochs=1)])
  np.testing.assert_array_equal(shares[1], single[1::4])


def test_streaming_state_resumes_at_the_same_batch():
  it = streaming.batches(toy_split(), global_batch_size=4, seed=0,
                         transform=lambda r: {**r, "label": r["label"] * 10})
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["label"] for _ in range(5)]
  resumed = streaming.batches(toy_split(), global_batch_size=4, seed=0,
                              transform=lambda r: {**r, "label": r["label"] * 10})
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["label"], want)


def test_streaming_a_tfds_split(tmp_path):
  fixtures.write_fer2013_csv(tmp_path / "download", fixtures.fer2013_rows())
  split = load("fer2013", tmp_path / "download", tmp_path / "tfds").split("train")
  batch = next(streaming.batches(split, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 48, 48, 1) and batch["label"].dtype == np.int32


def test_to_global_shards_the_batch_over_the_mesh():
  mesh = jax.make_mesh((8,), ("data",))
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "label": np.arange(16, dtype=np.int32)}
  global_batch = streaming.to_global(batch, mesh)
  assert global_batch["image"].shape == (16, 3)
  np.testing.assert_array_equal(np.asarray(global_batch["label"]), batch["label"])
  shards = global_batch["label"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2,) for s in shards)
