"""Tiny stand-ins for the real FER downloads, written in their exact public layouts.

Every writer takes a target folder and the content to write, so a test knows
exactly what the builder should read back.
"""
import csv
import dataclasses
import json
import pathlib

import numpy as np
from PIL import Image

FER7 = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
USAGES = ("Training", "PublicTest", "PrivateTest")
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger",
                "disgust", "fear", "contempt", "unknown", "NF")
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
                     "face_height", "facial_landmarks", "expression", "valence",
                     "arousal")


@dataclasses.dataclass
class Fer2013Rows:
  """FER2013 content: one entry per fer2013.csv row."""
  pixels: np.ndarray  # [N, 48, 48] uint8
  emotion: np.ndarray  # [N] 0..6
  usage: np.ndarray  # [N] 0..2


def fer2013_rows(usages=(0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2),
                 seed: int = 0) -> Fer2013Rows:
  """Smooth random faces (JPEG-friendly), labels cycling through the 7 classes."""
  rng = np.random.default_rng(seed)
  n = len(usages)
  coarse = rng.integers(0, 256, (n, 6, 6)).astype(np.float64)
  pixels = np.stack([np.asarray(Image.fromarray(c.astype(np.uint8)).resize(
      (48, 48), Image.Resampling.BICUBIC)) for c in coarse])
  return Fer2013Rows(pixels=pixels, emotion=np.arange(n) % 7,
                     usage=np.asarray(usages))


def write_fer2013_csv(folder: pathlib.Path, rows: Fer2013Rows) -> pathlib.Path:
  path = folder / "fer2013.csv"
  folder.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["emotion", "pixels", "Usage"])
    for pixels, emotion, usage in zip(rows.pixels, rows.emotion, rows.usage):
      writer.writerow([int(emotion), " ".join(map(str, pixels.ravel())),
                       USAGES[usage]])
  return path


def write_fer2013_csv_with(folder: pathlib.Path, line: int, column: str, value: str
                           ) -> pathlib.Path:
  """``write_fer2013_csv`` of the default rows with one field of one line (1: header)
  replaced: a malformed download."""
  path = write_fer2013_csv(folder, fer2013_rows())
  lines = path.read_text().splitlines()
  fields = lines[line - 1].split(",")
  fields[("emotion", "pixels", "Usage").index(column)] = value
  lines[line - 1] = ",".join(fields)
  path.write_text("\n".join(lines) + "\n")
  return path


def kaggle_paths(rows: Fer2013Rows) -> list[str]:
  """The Kaggle image-folder path of every row (numbered by row, as a stand-in id)."""
  paths = []
  for i, (emotion, usage) in enumerate(zip(rows.emotion, rows.usage)):
    part = "train" if usage == 0 else "test"
    paths.append(f"{part}/{FER7[emotion]}/{USAGES[usage]}_{10000 + i}.jpg")
  return paths


def write_kaggle(folder: pathlib.Path, rows: Fer2013Rows) -> None:
  for path, pixels in zip(kaggle_paths(rows), rows.pixels):
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / path, quality=95)


def write_fer2013_npz(folder: pathlib.Path, rows: Fer2013Rows,
                      names=None, votes=None) -> pathlib.Path:
  """The shared/data packing; every row is ``row_known``."""
  n = len(rows.emotion)
  names = [f"fer{i:07d}.png" for i in range(n)] if names is None else names
  votes = np.full((n, 10), -1) if votes is None else votes
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "fer2013.npz"
  np.savez(path, pixels=rows.pixels, emotion=rows.emotion.astype(np.int8),
           emotion_names=np.array(FER7), usage=rows.usage.astype(np.int8),
           usage_names=np.array(USAGES), row_known=np.ones(n, bool),
           pixel_source=np.zeros(n, np.int8), label_ambiguous=np.zeros(n, bool),
           kaggle_path=np.array(kaggle_paths(rows)),
           ferplus_name=np.array(names), ferplus_votes=np.asarray(votes, np.int8),
           ferplus_vote_names=np.array(VOTE_COLUMNS))
  return path


def write_ferplus_csv(folder: pathlib.Path, usage, names, votes) -> pathlib.Path:
  """fer2013new.csv: one row per fer2013.csv row, '' names for unrendered rows."""
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "fer2013new.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["Usage", "Image name", *VOTE_COLUMNS])
    for u, name, v in zip(usage, names, votes):
      writer.writerow([USAGES[u], name, *map(int, v)])
  return path


def write_ferplus_label_csvs(folder: pathlib.Path, usage, names, votes) -> None:
  """FER2013{Train,Valid,Test}/label.csv: ``name,"(0, 0, 48, 48)",votes`` per named row."""
  for u, sub in enumerate(("FER2013Train", "FER2013Valid", "FER2013Test")):
    (folder / sub).mkdir(parents=True, exist_ok=True)
    with open(folder / sub / "label.csv", "w", newline="") as f:
      writer = csv.writer(f)
      for row_usage, name, v in zip(usage, names, votes):
        if row_usage == u and name:
          writer.writerow([name, "(0, 0, 48, 48)", *map(int, v)])


def write_lines(path: pathlib.Path, lines, newline: str = "\n") -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes("".join(line + newline for line in lines).encode())
  return path


def write_ferplus_ran_lists(folder: pathlib.Path, occlusion, pose30, pose45) -> None:
  """RAN lists; each argument is a list of ``(label, fer name stem)``."""
  write_lines(folder / "jianfei_occlusion_list.txt",
              [f"{label}_{stem}.png 8 {i % 4}" for i, (label, stem) in enumerate(occlusion)],
              newline="\r\n")
  write_lines(folder / "pose_30_ferplus_list.txt",
              [f"{label}/{stem}.jpg" for label, stem in pose30])
  write_lines(folder / "pose_45_ferplus_list.txt",
              [f"{label}/{stem}.jpg" for label, stem in pose45])


def rafdb_image(seed: int, size=(100, 100)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (5, 5, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))


def write_rafdb(folder: pathlib.Path, train_labels, test_labels,
                size=(100, 100)) -> dict[str, np.ndarray]:
  """basic/Image/aligned/*.jpg and basic/EmoLabel/list_patition_label.txt (labels 1..7).

  Returns the written images by stem ('train_00001', 'test_0001', ...).
  """
  aligned = folder / "basic" / "Image" / "aligned"
  aligned.mkdir(parents=True, exist_ok=True)
  images, lines = {}, []
  for split, labels, digits in (("train", train_labels, 5), ("test", test_labels, 4)):
    for i, label in enumerate(labels, start=1):
      stem = f"{split}_{i:0{digits}d}"
      images[stem] = rafdb_image(len(images), size)
      Image.fromarray(images[stem]).save(aligned / f"{stem}_aligned.jpg", quality=95)
      lines.append(f"{stem}.jpg {label}")
  write_lines(folder / "basic" / "EmoLabel" / "list_patition_label.txt", lines)
  return images


def write_rafdb_ran_lists(folder: pathlib.Path, occlusion, pose30, pose45) -> None:
  """RAN RAF-DB lists; arguments are lists of ``(label 0..6, 'test_NNNN')``."""
  write_lines(folder / "rafdb_occlusion_list.txt",
              [f"{stem}_aligned {label} {1 + i % 4}" for i, (label, stem) in enumerate(occlusion)],
              newline="\r\n")
  for suffix, entries in (("", pose30), ("_45", pose45)):
    write_lines(folder / f"val_raf_db_list{suffix}.txt",
                [f"{label}/{stem}_aligned.jpg" for label, stem in entries])
    write_lines(folder / f"val_raf_db_label{suffix}.txt",
                [f"{len(entries)} 7", *(str(label) for label, _ in entries)])


@dataclasses.dataclass
class AffectnetRow:
  expression: int
  valence: float
  arousal: float
  box: tuple[int, int, int, int] = (10, 8, 20, 20)  # face_x, face_y, width, height
  image_size: tuple[int, int] = (64, 48)  # width, height
  face_value: int = 200


def affectnet_image(row: AffectnetRow) -> np.ndarray:
  """Black image with the face box filled grey ``face_value`` (clipped to the image)."""
  width, height = row.image_size
  image = np.zeros((height, width, 3), np.uint8)
  x, y, w, h = row.box
  image[max(y, 0):y + h, max(x, 0):x + w] = row.face_value
  return image


def write_affectnet(folder: pathlib.Path, train_rows, validation_rows) -> dict[str, list[str]]:
  """Manually_Annotated_file_lists/{training,validation}.csv and the images.

  training.csv has the release's header line, validation.csv none (as released).
  Returns the image stem (a hex hash) of every row per split.
  """
  lists = folder / "Manually_Annotated_file_lists"
  lists.mkdir(parents=True, exist_ok=True)
  stems = {}
  for split, rows, header in (("training", train_rows, True),
                              ("validation", validation_rows, False)):
    stems[split] = []
    with open(lists / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      if header:
        writer.writerow(AFFECTNET_COLUMNS)
      for i, row in enumerate(rows):
        stem = f"{'a' if split == 'training' else 'b'}{i:03d}" + "ab12" * 13
        stems[split].append(stem)
        sub = f"{100 + i % 3}/{stem}.jpg"
        path = folder / "Manually_Annotated_Images" / sub
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(affectnet_image(row)).save(path, quality=100)
        landmarks = ";".join(["1.0"] * 136)
        writer.writerow([sub, *row.box, landmarks, row.expression, row.valence,
                         row.arousal])
  return stems


def write_affectnet_ran_lists(folder: pathlib.Path, occlusion, pose30, pose45) -> None:
  """RAN AffectNet lists; arguments are lists of ``(label, hash stem)``."""
  write_lines(folder / "occlusion_affectnet_list.txt",
              [f"val/{label}/{stem}/" for label, stem in occlusion])
  write_lines(folder / "pose_30_affectnet_list.txt",
              [f"{label}/{stem}.jpg" for label, stem in pose30])
  write_lines(folder / "pose_45_affectnet_list.txt",
              [f"{label}/{stem}/8.jpg" for label, stem in pose45])


def write_image_folder(folder: pathlib.Path, layout: dict[str, int],
                       split: str | None = None, size=(40, 30)) -> None:
  """``layout`` maps class folder -> number of images; under ``split/`` if given."""
  root = folder / split if split else folder
  for i, (class_folder, count) in enumerate(sorted(layout.items())):
    (root / class_folder).mkdir(parents=True, exist_ok=True)
    for j in range(count):
      image = np.full((size[1], size[0], 3), 30 * i + j, np.uint8)
      suffix = ".png" if j % 2 else ".jpg"
      Image.fromarray(image).save(root / class_folder / f"img{j}{suffix}")


def write_json(path: pathlib.Path, content) -> pathlib.Path:
  path.write_text(json.dumps(content))
  return path
