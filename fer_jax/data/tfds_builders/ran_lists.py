"""The occlusion and pose test lists of RAN (Wang et al., "Region Attention
Networks for Pose and Occlusion Robust Facial Expression Recognition", TIP 2020),
as published in github.com/kaiwang960112/Challenge-condition-FER-dataset.

Each list names test images of FER+, RAF-DB or AffectNet with a label; a
builder matches the image stem against its own test images and adds the list as
an extra split (``test_occlusion``, ``test_pose30``, ``test_pose45``). Entries
are kept as listed, duplicates included, so accuracies follow the RAN protocol.
"""
import dataclasses
import pathlib
import re

from fer_jax.data.tfds_builders import common


@dataclasses.dataclass(frozen=True)
class RanList:
  """One list file: its name, a line regex with ``stem`` and ``label`` groups, and its format."""
  file_name: str
  pattern: str
  line_format: str
  lowercase_stems: bool = False

  def read(self, path: pathlib.Path) -> list[tuple[int, str, int]]:
    """``(line_number, image_stem, label)`` per non-empty line."""
    regex = re.compile(self.pattern)
    entries = []
    with open(path, newline="") as f:
      for number, line in enumerate(f, start=1):
        line = line.strip()
        if not line:
          continue
        match = regex.fullmatch(line)
        if match is None:
          raise common.DataError(
              f"{common.location(path, number)}: {line!r} does not match the "
              f"expected format {self.line_format!r}")
        stem = match["stem"].lower() if self.lowercase_stems else match["stem"]
        entries.append((number, stem, int(match["label"])))
    return entries


_LABEL_SLASH_NAME = r"(?P<label>\d)/(?P<stem>[^/\s]+)\.\w+"

FERPLUS = {
    "test_occlusion": RanList(
        "jianfei_occlusion_list.txt",
        r"(?P<label>\d)_(?P<stem>fer\d+)\.png\s+\d+\s+\d+",
        "<label>_<fername>.png 8 <k>"),
    "test_pose30": RanList("pose_30_ferplus_list.txt", _LABEL_SLASH_NAME,
                           "<label>/<fername>.jpg"),
    "test_pose45": RanList("pose_45_ferplus_list.txt", _LABEL_SLASH_NAME,
                           "<label>/<fername>.jpg"),
}

# RAF-DB stems are the names in list_patition_label.txt without extension
# ('test_0003'); the lists name the aligned files ('test_0003_aligned').
RAFDB = {
    "test_occlusion": RanList(
        "rafdb_occlusion_list.txt",
        r"(?P<stem>test_\d+)_aligned\s+(?P<label>\d)\s+\d+",
        "<test_xxxx>_aligned <label 0-6> <occlusion type>"),
    "test_pose30": RanList(
        "val_raf_db_list.txt",
        r"(?P<label>\d)/(?P<stem>test_\d+)_aligned\.jpg",
        "<label>/test_xxxx_aligned.jpg"),
    "test_pose45": RanList(
        "val_raf_db_list_45.txt",
        r"(?P<label>\d)/(?P<stem>test_\d+)_aligned\.jpg",
        "<label>/test_xxxx_aligned.jpg"),
}

# AffectNet stems are the image file names without extension (a hex hash,
# compared in lower case); the lists come from RAN's per-image crop folders,
# hence the trailing folders.
AFFECTNET = {
    "test_occlusion": RanList(
        "occlusion_affectnet_list.txt",
        r"val/(?P<label>\d)/(?P<stem>[0-9A-Fa-f]+)/",
        "val/<label>/<hash>/", lowercase_stems=True),
    "test_pose30": RanList("pose_30_affectnet_list.txt", _LABEL_SLASH_NAME,
                           "<label>/<hash>.jpg", lowercase_stems=True),
    "test_pose45": RanList(
        "pose_45_affectnet_list.txt",
        r"(?P<label>\d)/(?P<stem>[0-9A-Fa-f]+)/\d+\.jpg",
        "<label>/<hash>/8.jpg", lowercase_stems=True),
}


def find_lists(manual_dir: pathlib.Path,
               lists: dict[str, RanList]) -> dict[str, pathlib.Path]:
  """The split name -> list path of every list present under ``manual_dir``."""
  found = {split: common.find(manual_dir, ran_list.file_name)
           for split, ran_list in lists.items()}
  return {split: path for split, path in found.items() if path is not None}


def match(path: pathlib.Path, ran_list: RanList, stems: dict[str, int],
          num_classes: int) -> list[tuple[int, int, int]]:
  """``(line_number, record_position, label)`` per entry; raises on an unknown stem or label."""
  matched = []
  for number, stem, label in ran_list.read(path):
    if label >= num_classes:
      raise common.DataError(f"{common.location(path, number)}: label {label} "
                             f"is outside 0..{num_classes - 1}")
    if stem not in stems:
      raise common.DataError(f"{common.location(path, number)}: image {stem!r} "
                             "is not among the test images of the manual_dir")
    matched.append((number, stems[stem], label))
  return matched
