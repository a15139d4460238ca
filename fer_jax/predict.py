r"""Facial expressions of the faces in photos and videos, offline.

Library::

  import fer_jax
  predictor = fer_jax.load()   # fer2013-student-w16; or a pretrained name or model directory
  faces = predictor.predict(["a.jpg", rgb_array])  # one list of Face per image
  faces[0][0].label, faces[0][0].probabilities, faces[0][0].box

Command line::

  python -m fer_jax.predict PATH... [--model=NAME_OR_DIR] [--out=FILE.jsonl|FILE.csv]
      [--boxes=FILE.csv] [--no-detect] [--every=N] [--detect_every=K]
      [--timeline=PNG] [--annotate=DIR] [--min_face_size=PX] [--max_side=PX]

PATH is an image, a video (by extension: see ``VIDEO_EXTENSIONS``) or a folder
(searched recursively, files in sorted order, other extensions skipped; a folder
with neither is an input that cannot be used). The
output has one row per face: ``file``, ``frame`` and ``time_s`` (videos; null
for images), ``box`` ``[x0, y0, x1, y1]`` in input pixels, ``score`` (the
detector's face probability; 1.0 for given boxes and ``--no-detect``),
``label``, ``probabilities`` (class -> softmax probability), ``valence`` and
``arousal`` (null unless the model has a V/A head). JSON Lines on stdout by
default; ``--out=FILE.csv`` flattens it (``x0..y1``, one ``p_<class>`` column
per class).

Preprocessing (what the model sees): the face box is made square about its
centre (side = its longer side, rounded to whole pixels), cropped (parts off
the image repeat the edge pixels), converted to grey by ITU-R 601 luma
``round(0.299 R + 0.587 G + 0.114 B)`` when the model's image has one channel,
and resized to the model's ``image_shape`` (48x48 for FER2013) with PIL's
bilinear filter, which averages over the source pixels when shrinking. The
uint8 crop then goes through the model's own normalisation
(``TrainedModel.preprocess``). FER2013 faces are tight crops; MTCNN's box of
such a face covers about the same square (IoU 0.76-0.87 in our tests).
Photos are rotated upright by their EXIF orientation first.

Batching: all faces of a batch of images or frames (``--batch``, 8) go
through one jitted call of the model, padded to a power of two (at least 8,
at most 256 per call), so a new face count does not recompile. The detector
takes one frame per call (faster per frame on CPU than batches of frames) and
compiles one program per frame size, so a folder of photos of mixed sizes
compiles once per size.

Video: decoded with PyAV (FFmpeg bundled in its wheel), every ``--every``-th
frame. ``--detect_every=K`` runs the detector on every K-th sampled frame only
and reuses its boxes (and scores) on the frames in between: no tracking, so a
face that moves more than a fraction of its size in K frames is cropped off
centre. ``--timeline=PNG`` plots the class probabilities of the largest face
of each sampled frame over time, smoothed by a centred moving average over
``--smooth_s`` seconds (1 s by default: the odd number of sampled frames
nearest to it; frames without a face are skipped by the average, not counted
as zeros), and the engagement proxy below. With several videos, one PNG each,
named ``<PNG stem>-<video stem>.png``.

Engagement proxy: ``1 - P(neutral)`` of the largest face, smoothed as above,
i.e. how much probability the model puts on any expression other than
neutral. It is a proxy for facial expressiveness and nothing more: facial
expression is not engagement (an attentive viewer often looks neutral, a
smile may be social or unrelated to the content), the model's errors differ
between faces and settings, and it must not be used to judge individuals. It is
only drawn for models that have a class named ``neutral``.

Errors: an input that cannot be used (unreadable or corrupt file, video codec
not available, no boxes given for it) or that holds no face is reported on
stderr as one line naming the file and what was expected, and the others are
still processed. Exit status: 2 when an input could not be used or for a usage error (a bad
``--model``, ``--boxes`` row or option), else 1 when some usable input held no face,
else 0.
"""
import argparse
import collections
import csv
import dataclasses
import importlib.resources
import importlib.util
import itertools
import json
import math
import os
import pathlib
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from fer_jax import cli, model_dir

DEFAULT_MODEL = "fer2013-student-w16"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg",
                              ".wmv", ".flv", ".3gp", ".ts"})
MIN_BUCKET = 8
MAX_BUCKET = 256
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
PROXY_NAME = "engagement proxy (1 - P(neutral))"
EXIT_OK, EXIT_NO_FACE = 0, 1


class InputError(Exception):
  """One input that could not be used; the message says what was expected."""


class UsageError(Exception):
  """A bad option or option file; the CLI exits with status 2."""


@dataclasses.dataclass(frozen=True)
class Face:
  """One face: where, how sure the detector was, and its expression."""
  box: tuple[float, float, float, float]
  score: float
  probabilities: dict[str, float]
  label: str
  valence: float | None = None
  arousal: float | None = None


# ------------------------------------------------------------ pure helpers


def bucket(n: int) -> int:
  """Padded batch size: the next power of two, at least ``MIN_BUCKET``."""
  return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def to_rgb(image: np.ndarray) -> np.ndarray:
  """``(H, W)``, ``(H, W, 1|3|4)`` uint8 -> ``(H, W, 3)`` (grey repeated, alpha dropped)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise InputError(f"expected uint8 pixels, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
    raise InputError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def square_box(box: Sequence[float]) -> tuple[int, int, int]:
  """``(x0, y0, side)`` in whole pixels of the square about the box's centre."""
  x0, y0, x1, y1 = (float(v) for v in box)
  side = max(1, int(round(max(x1 - x0, y1 - y0))))
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def crop_square(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
  """The square of ``square_box`` from ``[H, W, C]``, off-image parts edge-padded."""
  h, w = image.shape[:2]
  x0, y0, side = square_box(box)
  # Clip into the image, then pad back: edge pixels rather than black, so a
  # face at the border does not get a dark frame the model never saw.
  cx0, cy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
  cx1, cy1 = max(min(x0 + side, w), cx0 + 1), max(min(y0 + side, h), cy0 + 1)
  inside = image[cy0:cy1, cx0:cx1]
  pad_y = (cy0 - y0, side - (cy1 - y0))
  pad_x = (cx0 - x0, side - (cx1 - x0))
  if any(pad_y + pad_x):
    inside = np.pad(inside, (pad_y, pad_x, (0, 0)), mode="edge")
  return inside


def luma(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma of ``[..., 3]`` uint8, rounded: ``[..., 1]`` uint8."""
  grey = rgb.astype(np.float32) @ LUMA
  return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]


def face_crop(image_rgb: np.ndarray, box: Sequence[float],
              image_shape: Sequence[int]) -> np.ndarray:
  """The model's uint8 input ``image_shape`` for one face box (see module doc)."""
  height, width, channels = image_shape
  crop = crop_square(image_rgb, box)
  if channels == 1:
    crop = luma(crop)
  mode = "L" if channels == 1 else "RGB"
  resized = Image.fromarray(crop[..., 0] if channels == 1 else crop, mode).resize(
      (width, height), Image.BILINEAR)
  return np.asarray(resized, np.uint8).reshape(height, width, channels)


def largest(faces: Sequence[Face]) -> Face | None:
  """The face with the largest box area, or None."""
  return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), default=None)


# ------------------------------------------------------------------ models


def load(name_or_dir: str | os.PathLike = DEFAULT_MODEL, *, min_face_size: float = 40.0,
         max_side: int | None = 1920, detector=None, flip: bool = False) -> "Predictor":
  """A ``Predictor`` for a pretrained model name or a model directory.

  Args:
    name_or_dir: a name under ``fer_jax/pretrained`` or a model directory;
      by default ``DEFAULT_MODEL``, the shipped student best on PublicTest.
    min_face_size: smallest face the default detector looks for, in pixels.
    max_side: the default detector shrinks larger frames to this side first.
    detector: a ``fer_jax.detect.MTCNN`` (or anything with ``detect_batch``)
      to use instead; built lazily otherwise.
    flip: average each face's probabilities (and V/A) with its mirror image's:
      test-time flip averaging, twice the classifier's work.

  Raises:
    model_dir.ModelDirError: no such model, or a directory of another format.
  """
  model = model_dir.load(name_or_dir)
  return Predictor(model, detector=detector, min_face_size=min_face_size, max_side=max_side,
                   flip=flip)


# --------------------------------------------------------------- predictor


class Predictor:
  """Detection, cropping and batched classification with one trained model."""

  def __init__(self, model: model_dir.TrainedModel, detector=None,
               min_face_size: float = 40.0, max_side: int | None = 1920,
               detect_batch: int = 1, flip: bool = False):
    self.model = model
    self._model_forward = model_dir.flip_averaged(model.forward) if flip else model.forward
    # Frames per detector call. On 2 CPU cores one 720p frame at a time was the
    # fastest per frame (37-52 ms; 60 ms/frame in pairs, 82 in eights at 80/640).
    self.detect_batch = detect_batch
    self.traces = 0  # how often the classifier was traced (tests pin recompiles)
    self._detector = detector
    self._detector_args = dict(min_face_size=min_face_size, max_side=max_side)
    self._forward = jax.jit(self._probabilities)
    self._variables = jax.device_put(model.variables)  # once, not on every call

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.model.class_names)

  @property
  def detector(self):
    if self._detector is None:  # built on first use: --boxes/--no-detect never load it
      from fer_jax.detect import mtcnn  # pylint: disable=import-outside-toplevel
      self._detector = mtcnn.MTCNN(**self._detector_args)
    return self._detector

  def _probabilities(self, variables, images):
    self.traces += 1  # runs at trace time only
    logits, va = self._model_forward(variables, images)
    return jax.nn.softmax(logits.astype(np.float32), axis=-1), va

  def classify(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax ``[N, K]`` and V/A ``[N, num_va]`` of uint8 crops ``[N, *image_shape]``.

    One call per ``MAX_BUCKET`` crops, each padded to ``bucket(n)`` with zeros.
    """
    crops = np.asarray(crops, np.uint8).reshape(-1, *self.model.image_shape)
    probs, va = [], []
    for start in range(0, len(crops), MAX_BUCKET):
      chunk = crops[start:start + MAX_BUCKET]
      padded = np.zeros((bucket(len(chunk)), *chunk.shape[1:]), np.uint8)
      padded[:len(chunk)] = chunk
      p, v = jax.device_get(self._forward(self._variables, padded))
      probs.append(np.asarray(p[:len(chunk)]))
      va.append(np.asarray(v[:len(chunk)]))
    if not probs:
      return (np.zeros((0, len(self.class_names)), np.float32),
              np.zeros((0, self.model.num_va), np.float32))
    return np.concatenate(probs), np.concatenate(va)

  def detect(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
    """Detector output per RGB image.

    Images of one size go through ``detect_batch`` ``self.detect_batch`` at
    a time, the last call padded by repeating its last frame, so that each
    frame size compiles one program.
    """
    out: list[list[dict]] = [[] for _ in images]
    by_shape = collections.defaultdict(list)
    for i, image in enumerate(images):
      by_shape[image.shape].append(i)
    for indices in by_shape.values():
      for start in range(0, len(indices), self.detect_batch):
        chunk = indices[start:start + self.detect_batch]
        padding = [images[chunk[-1]]] * (self.detect_batch - len(chunk))
        frames = np.stack([images[i] for i in chunk] + padding)
        for i, faces in zip(chunk, self.detector.detect_batch(frames)):
          out[i] = faces
    return out

  def faces(self, images: Sequence[np.ndarray],
            boxes: Sequence[Sequence[Sequence[float]]],
            scores: Sequence[Sequence[float]]) -> list[list[Face]]:
    """Classifies the given boxes of each RGB image in one batched call."""
    crops = [face_crop(image, box, self.model.image_shape)
             for image, image_boxes in zip(images, boxes) for box in image_boxes]
    probs, va = self.classify(np.stack(crops) if crops else np.zeros((0,)))
    out, k = [], 0
    for image_boxes, image_scores in zip(boxes, scores):
      out.append([self._face(box, score, probs[k + j], va[k + j])
                  for j, (box, score) in enumerate(zip(image_boxes, image_scores))])
      k += len(image_boxes)
    return out

  def _face(self, box, score, probs, va) -> Face:
    names = self.class_names
    has_va = len(va) == 2
    return Face(box=tuple(float(v) for v in box), score=float(score),
                probabilities={n: float(p) for n, p in zip(names, probs)},
                label=names[int(np.argmax(probs))],
                valence=float(va[0]) if has_va else None,
                arousal=float(va[1]) if has_va else None)

  def predict(self, images, boxes=None, detect: bool = True) -> list[list[Face]]:
    """Faces per image.

    Args:
      images: one image or a list of them; an image is a uint8 array
        ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` RGB, or a file path. A 4-D
        array is a batch ``[N, H, W, C]``.
      boxes: optional own face boxes ``(x0, y0, x1, y1)``: a list per image
        (None for an image means: detect), or one list for a single image.
      detect: False treats each image as one face crop (the whole image is
        its box), when ``boxes`` gives none.

    Returns:
      One list of ``Face`` per image (empty when no face was found).
    """
    single = _is_single(images)
    images = [_as_image(x) for x in ([images] if single else list(images))]
    if boxes is not None and single:
      boxes = [boxes]
    boxes = list(boxes) if boxes is not None else [None] * len(images)
    if len(boxes) != len(images):
      raise ValueError(f"{len(boxes)} box lists for {len(images)} images")
    return self.faces(images, *self._boxes_and_scores(images, boxes, detect))

  def _boxes_and_scores(self, images, boxes, detect):
    """Given boxes, whole images or detections for each image."""
    to_detect = [i for i, b in enumerate(boxes) if b is None and detect]
    found = dict(zip(to_detect, self.detect([images[i] for i in to_detect])))
    out_boxes, out_scores = [], []
    for i, (image, given) in enumerate(zip(images, boxes)):
      if given is not None:
        image_boxes, image_scores = [tuple(b) for b in given], [1.0] * len(given)
      elif not detect:
        image_boxes, image_scores = [whole_box(image)], [1.0]
      else:
        image_boxes = [f["box"] for f in found[i]]
        image_scores = [f["score"] for f in found[i]]
      out_boxes.append(image_boxes)
      out_scores.append(image_scores)
    return out_boxes, out_scores


def whole_box(image: np.ndarray) -> tuple[float, float, float, float]:
  return (0.0, 0.0, float(image.shape[1]), float(image.shape[0]))


def _is_single(images) -> bool:
  if isinstance(images, (str, os.PathLike)):
    return True
  return isinstance(images, np.ndarray) and images.ndim in (2, 3)


def _as_image(x) -> np.ndarray:
  if isinstance(x, (str, os.PathLike)):
    return read_image(x)
  return to_rgb(x)


# ------------------------------------------------------------------ inputs


_IMAGE_KINDS = "JPEG, PNG, BMP, GIF, TIFF or WebP"


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as RGB uint8, upright by its EXIF orientation."""
  try:
    with Image.open(path) as image:
      image.load()  # decodes now, so a truncated file fails here
      return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
  except Image.UnidentifiedImageError:
    raise InputError(f"not a readable image (expected {_IMAGE_KINDS}, or a video with "
                     f"extension {'/'.join(sorted(VIDEO_EXTENSIONS))})") from None
  except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
    raise InputError(f"cannot read the file ({type(e).__name__}: {e.strerror})") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL's decoders raise these on bad data
    raise InputError(f"not a readable image, corrupt or truncated ({type(e).__name__}: {e}; "
                     f"expected a complete {_IMAGE_KINDS} file)") from None


def is_video(path: pathlib.Path) -> bool:
  return path.suffix.lower() in VIDEO_EXTENSIONS


def expand_paths(paths: Iterable[str]) -> list[pathlib.Path]:
  """Files as given; folders recursively, sorted, images and videos only. A folder
  with neither stays in the list, for the caller to report."""
  out = []
  for text in paths:
    path = pathlib.Path(text)
    media = sorted(p for p in path.rglob("*") if p.is_file()
                   and p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
                   ) if path.is_dir() else []
    out.extend(media or [path])
  return out


def _open_video(path):
  """``(container, stream)`` of the first video stream; InputError otherwise."""
  import av  # pylint: disable=import-outside-toplevel
  try:
    container = av.open(str(path))
  except (av.error.FFmpegError, OSError) as e:
    raise InputError(f"not a readable video ({e})") from None
  if not container.streams.video:
    container.close()
    raise InputError("no video stream in the file")
  stream = container.streams.video[0]
  if stream.codec_context is None:  # FFmpeg has no decoder for it
    container.close()
    raise InputError(_NO_CODEC.format(codec="of stream 0"))
  stream.thread_type = "AUTO"  # FFmpeg's frame threads decode ahead of us
  return container, stream


_NO_CODEC = ("the video codec {codec} is not available in PyAV's FFmpeg (expected e.g. "
             "H.264, HEVC, MPEG-4, VP8/VP9 or AV1; re-encode with ffmpeg -c:v libx264)")


def video_frames(path, every: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
  """``(frame index, time in s, RGB frame)`` of every ``every``-th decoded frame."""
  import av  # pylint: disable=import-outside-toplevel
  container, stream = _open_video(path)
  rate = float(stream.average_rate or 0) or 25.0
  with container:
    try:
      for index, frame in enumerate(container.decode(stream)):
        if index % every:
          continue  # decoded all the same (inter frames need it), not converted
        time = float(frame.time) if frame.time is not None else index / rate
        yield index, time, frame.to_ndarray(format="rgb24")
    except av.error.DecoderNotFoundError:
      raise InputError(_NO_CODEC.format(codec=repr(stream.codec_context.name))) from None
    except av.error.FFmpegError as e:
      codec = stream.codec_context.name
      raise InputError(f"cannot decode the video (codec {codec!r}: {e}; expected an intact "
                       "video file)") from None


def prefetch(items: Iterable, depth: int = 16) -> Iterator:
  """``items`` produced by a background thread ``depth`` ahead.

  PyAV releases the GIL while decoding and XLA while computing, so decoding
  the next frames overlaps the model on the current ones. Exceptions are
  re-raised in the consumer.
  """
  q: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():  # a consumer that stopped early must not leave us blocked
      try:
        q.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in items:
        if not put((True, item)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      put((False, e))
      return
    put((True, done))

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      ok, item = q.get()
      if not ok:
        raise item
      if item is done:
        return
      yield item
  finally:
    stop.set()


# ----------------------------------------------------------------- boxes CSV


def read_boxes_csv(path: str | os.PathLike) -> dict[tuple[str, int | None], list[tuple]]:
  """``{(file, frame or None): [(x0, y0, x1, y1), ...]}`` from a CSV with a
  header ``file,x0,y0,x1,y1`` and an optional ``frame`` column.

  Raises:
    UsageError: naming the file, line number and field of a bad row.
  """
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' BOM
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"--boxes={path}: cannot read ({e})") from None
  header = [h.strip() for h in rows[0]] if rows else []
  missing = [c for c in ("file", "x0", "y0", "x1", "y1") if c not in header]
  if missing:
    raise UsageError(f"--boxes={path} line 1: expected a header with file,x0,y0,x1,y1 "
                     f"(frame optional); missing {','.join(missing)}")
  table = collections.defaultdict(list)
  for line, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    key, box = _parse_box_row(path, line, dict(zip(header, row)))
    table[key].append(box)
  return dict(table)


def _parse_box_row(path, line: int, row: dict) -> tuple[tuple[str, int | None], tuple]:
  def where(field):
    return f"--boxes={path} line {line}, field {field}"

  if not row.get("file", "").strip():
    raise UsageError(f"{where('file')}: expected a file name, got nothing")
  values = {}
  for field in ("x0", "y0", "x1", "y1"):
    text = (row.get(field) or "").strip()
    try:
      value = float(text)
    except ValueError:
      raise UsageError(f"{where(field)}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
      raise UsageError(f"{where(field)}: expected a finite number, got {text!r}")
    values[field] = value
  for lo, hi in (("x0", "x1"), ("y0", "y1")):
    if values[hi] <= values[lo]:
      raise UsageError(f"{where(hi)}: expected {hi} > {lo} ({values[lo]:g}), "
                       f"got {row[hi].strip()!r}")
  frame_text = (row.get("frame") or "").strip()
  if frame_text and not frame_text.isdigit():
    raise UsageError(f"{where('frame')}: expected a frame index >= 0 or nothing, "
                     f"got {frame_text!r}")
  frame = int(frame_text) if frame_text else None
  return (os.path.normpath(row["file"].strip()), frame), tuple(values.values())


class BoxTable:
  """Looks up the ``--boxes`` rows of an input file.

  A row's ``file`` matches an input given by the same path (as typed or
  resolved from the current directory), else by its file name when that
  name is unique among the rows.
  """

  def __init__(self, table: dict):
    self.table = table
    self.by_path = collections.defaultdict(list)
    self.by_name = collections.defaultdict(set)
    for (file, frame), boxes in table.items():
      self.by_path[str(pathlib.Path(file).resolve())].append((frame, boxes))
      self.by_name[os.path.basename(file)].add(file)

  def rows(self, path: pathlib.Path) -> dict[int | None, list[tuple]]:
    """``{frame or None: boxes}`` for ``path`` (empty when none)."""
    found = self.by_path.get(str(path.resolve()))
    if found is None:
      names = self.by_name.get(path.name, set())
      if len(names) == 1:
        found = self.by_path[str(pathlib.Path(next(iter(names))).resolve())]
    return dict(found or [])


# ------------------------------------------------------------------ output


def record(file: str, face: Face, frame: int | None = None, time_s: float | None = None
           ) -> dict[str, Any]:
  """One output row (the JSONL object) of one face."""
  return {"file": file, "frame": frame,
          "time_s": None if time_s is None else round(time_s, 6),
          "box": [round(v, 3) for v in face.box], "score": round(face.score, 6),
          "label": face.label,
          "probabilities": {k: round(v, 6) for k, v in face.probabilities.items()},
          "valence": None if face.valence is None else round(face.valence, 6),
          "arousal": None if face.arousal is None else round(face.arousal, 6)}


def csv_columns(class_names: Sequence[str]) -> list[str]:
  return (["file", "frame", "time_s", "x0", "y0", "x1", "y1", "score", "label"]
          + [f"p_{c}" for c in class_names] + ["valence", "arousal"])


def flatten(row: dict) -> dict:
  """A JSONL row as a CSV row (None -> empty cell)."""
  flat = {k: row[k] for k in ("file", "frame", "time_s", "score", "label", "valence",
                              "arousal")}
  flat.update(zip(("x0", "y0", "x1", "y1"), row["box"]))
  flat.update({f"p_{k}": v for k, v in row["probabilities"].items()})
  return {k: "" if v is None else v for k, v in flat.items()}


class Writer:
  """JSONL (stdout or a file) or CSV rows, chosen by the file's extension."""

  def __init__(self, out: str | None, class_names: Sequence[str]):
    self.is_csv = bool(out) and out.lower().endswith(".csv")
    if out and not self.is_csv and not out.lower().endswith((".jsonl", ".ndjson", ".json")):
      raise UsageError(f"--out={out}: expected a .jsonl or .csv file name")
    try:
      self.stream = open(out, "w", newline="") if out else sys.stdout
    except OSError as e:
      raise UsageError(f"--out={out}: cannot write ({e.strerror})") from None
    self.csv = None
    if self.is_csv:
      self.csv = csv.DictWriter(self.stream, csv_columns(class_names))
      self.csv.writeheader()

  def write(self, row: dict) -> None:
    if self.csv is not None:
      self.csv.writerow(flatten(row))
    else:
      self.stream.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if self.stream is not sys.stdout:
      self.stream.close()
    else:
      self.stream.flush()


# ---------------------------------------------------------------- timeline


def smooth_window(sample_rate: float, seconds: float) -> int:
  """Samples in ``seconds`` at ``sample_rate``, rounded, made odd (centred), >= 1."""
  return max(1, int(round(seconds * sample_rate))) | 1  # an even count becomes the next odd


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average along axis 0 that skips NaNs (NaN where all are).

  Near the ends the window is cut short rather than padded.
  """
  values = np.asarray(values, np.float64)
  valid = np.isfinite(values)
  filled = np.where(valid, values, 0.0)
  half = window // 2
  kernel = np.ones(window)

  def conv(x):
    return np.apply_along_axis(lambda col: np.convolve(col, kernel, "full")[half:half + len(col)],
                               0, x)

  sums, counts = conv(filled), conv(valid.astype(np.float64))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def engagement_proxy(probabilities: np.ndarray, class_names: Sequence[str]) -> np.ndarray | None:
  """``1 - P(neutral)`` per row of ``[T, K]`` probabilities; None without 'neutral'."""
  names = [c.lower() for c in class_names]
  if "neutral" not in names:
    return None
  return 1.0 - np.asarray(probabilities)[:, names.index("neutral")]


def timeline_series(rows: Sequence[tuple[float, Face | None]], class_names: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Times ``[T]`` and probabilities ``[T, K]`` of the largest face (NaN: none)."""
  times = np.array([t for t, _ in rows], np.float64)
  probs = np.full((len(rows), len(class_names)), np.nan)
  for i, (_, face) in enumerate(rows):
    if face is not None:
      probs[i] = [face.probabilities[c] for c in class_names]
  return times, probs


def plot_timeline(png: str | os.PathLike, title: str, times: np.ndarray, probs: np.ndarray,
                  class_names: Sequence[str], window: int, window_s: float) -> None:
  """Smoothed class probabilities and the engagement proxy over time, as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  smoothed = moving_average(probs, window)
  proxy = engagement_proxy(probs, class_names)
  fig, axes = plt.subplots(2 if proxy is not None else 1, 1, sharex=True, squeeze=False,
                           figsize=(10, 6 if proxy is not None else 3.5))
  top = axes[0, 0]
  for k, name in enumerate(class_names):
    top.plot(times, smoothed[:, k], label=name, lw=1.5)
  top.set(ylabel="probability", ylim=(0, 1),
          title=f"{title}: largest face, centred moving average over {window} sampled "
                f"frames (~{window_s:g} s)")
  top.legend(loc="upper right", fontsize=8, ncol=4)
  if proxy is not None:
    bottom = axes[1, 0]
    bottom.plot(times, moving_average(proxy, window), color="k", lw=2)
    bottom.set(ylabel="proxy", ylim=(0, 1), title=f"{PROXY_NAME}: expressiveness, "
                                                  "not a measure of engagement")
  axes[-1, 0].set_xlabel("time (s)")
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def timeline_path(png: str, video: pathlib.Path, several: bool) -> pathlib.Path:
  """``png`` itself, or ``<stem>-<video stem>.png`` when there are several videos."""
  path = pathlib.Path(png)
  return path.with_name(f"{path.stem}-{video.stem}{path.suffix}") if several else path


# --------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m fer_jax.predict",
      description="Facial expressions of the faces in images, folders and videos.")
  parser.add_argument("paths", nargs="+", metavar="PATH", help="image, video or folder")
  parser.add_argument("--model", default=DEFAULT_MODEL,
                      help=f"pretrained name or model directory (default {DEFAULT_MODEL})")
  parser.add_argument("--out", help="FILE.jsonl or FILE.csv (default: JSONL on stdout)")
  parser.add_argument("--boxes", help="CSV file,x0,y0,x1,y1[,frame] of own face boxes")
  parser.add_argument("--no-detect", "--no_detect", dest="no_detect", action="store_true",
                      help="each image/frame is one face crop")
  parser.add_argument("--every", type=_positive, default=1, help="video: every Nth frame")
  parser.add_argument("--detect_every", "--detect-every", type=_positive, default=1,
                      help="video: detect on every Kth sampled frame, reuse boxes between")
  parser.add_argument("--timeline", help="video: PNG of probabilities over time")
  parser.add_argument("--annotate", metavar="DIR",
                      help="images: write DIR/<name>.png with boxes and labels drawn")
  parser.add_argument("--smooth_s", type=float, default=1.0,
                      help="timeline: moving-average window in seconds (default 1)")
  parser.add_argument("--min_face_size", type=float, default=40.0, help="detector, pixels")
  parser.add_argument("--max_side", type=int, default=1920,
                      help="detector shrinks larger frames to this side (0: never)")
  parser.add_argument("--batch", type=_positive, default=8,
                      help="images or frames whose faces are classified in one call")
  parser.add_argument("--flip", action="store_true",
                      help="average each face with its mirror image (test-time flip "
                           "averaging; twice the classifier's work)")
  return parser.parse_args(argv)


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
  return value


class Run:
  """The state of one command: predictor, writer, options and failures."""

  def __init__(self, args, predictor: Predictor, writer: Writer, boxes: BoxTable | None):
    self.args, self.predictor, self.writer, self.boxes = args, predictor, writer, boxes
    self.bad_inputs = self.faceless = 0

  def fail(self, path, message: str, no_face: bool = False) -> None:
    """One line on stderr naming an input that could not be used (or, ``no_face``, a
    usable one without a face); the run goes on."""
    if no_face:
      self.faceless += 1
    else:
      self.bad_inputs += 1
    print(f"fer_jax.predict: {path}: {message}", file=sys.stderr, flush=True)

  def boxes_for(self, path: pathlib.Path, frame: int | None) -> list | None:
    """The given boxes of an image (frame None) or a video frame; None: detect."""
    if self.boxes is None:
      return None
    rows = self.boxes.rows(path)
    return rows.get(frame, rows.get(None, []))


def run_images(run: Run, paths: Sequence[pathlib.Path]) -> None:
  """Images in batches of ``--batch``: read, detect, classify, write."""
  for start in range(0, len(paths), run.args.batch):
    chunk, images, boxes = [], [], []
    for path in paths[start:start + run.args.batch]:
      try:
        images.append(read_image(path))
      except InputError as e:
        run.fail(path, str(e))
        continue
      chunk.append(path)
      boxes.append(run.boxes_for(path, None))
    if not chunk:
      continue
    results = run.predictor.predict(images, boxes=boxes, detect=not run.args.no_detect)
    for path, image, given, faces in zip(chunk, images, boxes, results):
      _write_image_faces(run, path, given, faces)
      if run.args.annotate and faces:
        out = pathlib.Path(run.args.annotate) / f"{path.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        annotate(image, faces).save(out)


def annotate(image: np.ndarray, faces: Sequence[Face]) -> Image.Image:
  """The image with each face's box and top label (and its probability) drawn on it."""
  canvas = Image.fromarray(to_rgb(image))
  draw = ImageDraw.Draw(canvas)
  for face in faces:
    x0, y0, x1, y1 = face.box
    draw.rectangle((x0, y0, x1, y1), outline=(255, 215, 0), width=3)
    text = f"{face.label} {face.probabilities[face.label]:.0%}"
    left, top, right, bottom = draw.textbbox((x0, y0), text)
    draw.rectangle((x0, y0 - (bottom - top) - 6, x0 + right - left + 6, y0), fill=(255, 215, 0))
    draw.text((x0 + 3, y0 - (bottom - top) - 4), text, fill=(0, 0, 0))
  return canvas


def _write_image_faces(run: Run, path, given, faces: Sequence[Face]) -> None:
  if not faces:
    if given is not None:
      run.fail(path, f"no boxes for this file in --boxes={run.args.boxes} "
                     "(expected rows with its path or file name)")
    else:
      run.fail(path, f"no face found (expected a face of at least "
                     f"{run.args.min_face_size:g} px; see --min_face_size, --boxes, "
                     "--no-detect)", no_face=True)
    return
  for face in faces:
    run.writer.write(record(str(path), face))


def frame_batches(frames: Iterable, size: int) -> Iterator[list]:
  """Consecutive lists of ``size`` items (the last may be shorter)."""
  batch = []
  for item in frames:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def video_batch_size(batch: int, detect_every: int) -> int:
  """Frames per video batch: a multiple of ``detect_every``, so that every batch
  starts on a detected frame and held boxes never cross a batch boundary."""
  return detect_every * max(1, round(batch / detect_every))


def video_boxes(run: Run, path: pathlib.Path, batch: list) -> tuple[list, list]:
  """Boxes and scores per frame of one video batch.

  Given boxes (``--boxes``), the whole frame (``--no-detect``), or detections
  on every ``--detect_every``-th frame, held on the frames in between.
  """
  frames = [frame for _, _, frame in batch]
  if run.boxes is not None:
    boxes = [run.boxes_for(path, index) for index, _, _ in batch]
    return boxes, [[1.0] * len(b) for b in boxes]
  if run.args.no_detect:
    return [[whole_box(f)] for f in frames], [[1.0]] * len(frames)
  k = run.args.detect_every
  found = run.predictor.detect(frames[::k])
  held = [found[pos // k] for pos in range(len(frames))]
  return ([[f["box"] for f in faces] for faces in held],
          [[f["score"] for f in faces] for faces in held])


def run_video(run: Run, path: pathlib.Path, png: pathlib.Path | None) -> None:
  """A video: per-frame rows, then the timeline PNG if asked for."""
  size = video_batch_size(run.args.batch, run.args.detect_every)
  series, count = [], 0
  try:
    for batch in frame_batches(prefetch(video_frames(path, run.args.every)), size):
      results = run.predictor.faces([f for _, _, f in batch], *video_boxes(run, path, batch))
      for (index, time, _), faces in zip(batch, results):
        for face in faces:
          run.writer.write(record(str(path), face, index, time))
        series.append((time, largest(faces)))
        count += len(faces)
  except InputError as e:
    run.fail(path, str(e))
    return
  if not series:
    run.fail(path, "no video frames decoded (expected a video with at least one frame)")
  elif not count:
    run.fail(path, "no face found in any sampled frame (expected faces of at least "
                   f"{run.args.min_face_size:g} px; see --min_face_size, --boxes)", no_face=True)
  if png is not None and series:
    _write_timeline(run, path, png, series)


def _write_timeline(run: Run, path: pathlib.Path, png: pathlib.Path, series: list) -> None:
  names = run.predictor.class_names
  times, probs = timeline_series(series, names)
  rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] \
      else 1.0
  window = smooth_window(rate, run.args.smooth_s)
  plot_timeline(png, path.name, times, probs, names, window, run.args.smooth_s)


def setup(args) -> tuple[Predictor, Writer, BoxTable | None]:
  """Checks the options and loads the model; UsageError or ModelDirError."""
  if args.timeline and importlib.util.find_spec("matplotlib") is None:
    raise UsageError("--timeline needs matplotlib, which is not installed "
                     "(pip install matplotlib, or the fer_jax[experiments] extra)")
  if args.smooth_s <= 0:
    raise UsageError(f"--smooth_s={args.smooth_s:g}: expected seconds > 0")
  boxes = BoxTable(read_boxes_csv(args.boxes)) if args.boxes else None
  try:
    model = model_dir.load(args.model)
  except model_dir.ModelDirError as e:
    raise UsageError(f"--model={args.model}: {e}") from None
  predictor = Predictor(model, min_face_size=args.min_face_size, flip=args.flip,
                        max_side=args.max_side or None)
  return predictor, Writer(args.out, predictor.class_names), boxes


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (see the module doc)."""
  args = parse_args(argv)
  try:
    predictor, writer, boxes = setup(args)
  except UsageError as e:
    print(f"fer_jax.predict: {e}", file=sys.stderr)
    return cli.EXIT_BAD_INPUT
  run = Run(args, predictor, writer, boxes)
  paths = expand_paths(args.paths)
  videos = [p for p in paths if is_video(p)]
  try:
    for video_group, group in itertools.groupby(paths, is_video):
      group = list(group)
      for path in [p for p in group if not p.exists()]:
        run.fail(path, "no such file or folder")
      for path in [p for p in group if p.is_dir()]:
        run.fail(path, "no image or video in this folder (searched for "
                 f"{' '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))})")
      group = [p for p in group if p.is_file()]
      if not video_group:
        run_images(run, group)
        continue
      for path in group:
        png = timeline_path(args.timeline, path, len(videos) > 1) if args.timeline else None
        run_video(run, path, png)
  finally:
    writer.close()
  if run.bad_inputs:
    return cli.EXIT_BAD_INPUT
  return EXIT_NO_FACE if run.faceless else EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
