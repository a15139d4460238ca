"""Photo-like test scenes: FER2013 faces pasted onto textured clutter at known places.

Blurred tinted noise, faces scaled and slightly rotated, and the upright pasted
square as the expected box; the detector's and the predictor's tests use the same
scenes.
"""
import functools
import pathlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

FER2013 = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fer2013" \
    / "fer2013.npz"
# (PublicTest index among usage == 1, centre (x, y), side in px, degrees): faces that MTCNN
# finds when pasted alone on a 480x640 canvas (see tests/test_detect.py).
FACES = ((2, (140, 130), 110, -6), (13, (330, 300), 150, 4), (30, (530, 150), 95, 7))


@functools.lru_cache(maxsize=1)
def _public_test_pixels() -> np.ndarray:
  # Read once per session: decompressing the 79 MB archive is the slow part.
  with np.load(FER2013) as data:
    return data["pixels"][data["usage"] == 1]


def public_test_faces(indices) -> list[np.ndarray]:
  """48x48 uint8 FER2013 PublicTest faces; skips the test when the data is absent."""
  if not FER2013.is_file():
    pytest.skip(f"FER2013 not found at {FER2013.resolve()}")
  pixels = _public_test_pixels()
  return [pixels[i] for i in indices]


def background(shape, seed=0) -> np.ndarray:
  """Grey-ish RGB clutter ``shape + (3,)``: blurred noise, stretched, slightly tinted."""
  rng = np.random.default_rng(seed)
  channels = []
  for c in range(3):
    noise = Image.fromarray(rng.integers(0, 256, shape, np.uint8))
    smooth = np.asarray(noise.filter(ImageFilter.GaussianBlur(6)), np.float32)
    channels.append(128 + (smooth - smooth.mean()) * 4 + 8 * (c - 1))
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def paste(canvas, face48, centre, side, degrees):
  """Pastes a scaled, rotated grey face; returns the image and the upright
  square of the face (the expected box)."""
  face = Image.fromarray(face48).convert("RGB").resize((side, side), Image.BICUBIC)
  mask = Image.new("L", (side, side), 255)
  face, mask = (im.rotate(degrees, Image.BICUBIC, expand=True) for im in (face, mask))
  out = Image.fromarray(canvas)
  corner = (centre[0] - face.width // 2, centre[1] - face.height // 2)
  out.paste(face, corner, mask)
  half = side / 2
  return np.asarray(out), (centre[0] - half, centre[1] - half, centre[0] + half,
                           centre[1] + half)


def scene(faces48, placements, shape=(480, 640), seed=0):
  """All faces pasted onto one background; ``(image, expected boxes)``."""
  canvas, boxes = background(shape, seed), []
  for face, (centre, side, degrees) in zip(faces48, placements):
    canvas, box = paste(canvas, face, centre, side, degrees)
    boxes.append(box)
  return canvas, boxes


def iou(a, b) -> float:
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union
