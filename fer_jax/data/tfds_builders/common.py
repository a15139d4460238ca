"""What every FER TFDS builder shares: file lookup in the manual dir, errors that
name the file and row, image decoding/cropping, and the stored image feature.

Builders write ``array_record`` files and are read back with
``tfds.data_source``, so nothing here may import TensorFlow: images are either
raw ``uint8`` bytes (``tfds.features.Tensor`` with byte encoding) or PNG/JPEG
bytes encoded by Pillow and decoded by TFDS with Pillow.
"""
import csv
import io
import pathlib
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fer_jax.data.base import DataError

VERSION = tfds.core.Version("1.0.0")
IMAGE_ENCODINGS = ("raw", "png", "jpeg")
_JPEG_QUALITY = 95
# Manual dirs are user downloads with arbitrary wrapping folders; searching a
# few levels finds the files without walking a 300k-image tree.
_MAX_SEARCH_DEPTH = 4


def location(path: pathlib.Path | str, line: int | None = None) -> str:
  return f"{path}, line {line}" if line is not None else str(path)


def check_manual_dir(manual_dir, instructions: str) -> pathlib.Path:
  """Returns ``manual_dir`` as a path; raises if it is unset, missing or empty."""
  if not manual_dir:
    raise FileNotFoundError(f"no manual_dir given\nexpected:\n{instructions}")
  path = pathlib.Path(manual_dir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(
        f"manual_dir {path} does not exist\nexpected:\n{instructions}")
  if not any(path.iterdir()):
    raise FileNotFoundError(f"manual_dir {path} is empty\nexpected:\n{instructions}")
  return path


def find(manual_dir: pathlib.Path, relative: str) -> pathlib.Path | None:
  """The shallowest path under ``manual_dir`` ending in ``relative``, or None."""
  root = pathlib.Path(manual_dir)
  for depth in range(_MAX_SEARCH_DEPTH + 1):
    matches = sorted(root.glob("*/" * depth + relative))
    if matches:
      return matches[0]
  return None


def read_csv(
    path: pathlib.Path, columns: Sequence[str],
    headerless_columns: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields ``(line_number, row)`` for each data row, checking the header and field count.

  Args:
    path: the csv file.
    columns: the columns a row must have.
    headerless_columns: if given, a file whose first line is not a header is
      read with these column names (AffectNet's validation.csv has no header).
  """
  with open(path, newline="") as f:
    reader = csv.reader(f)
    first = next(reader, [])
    if all(c in first for c in columns):
      names, first_is_data = first, False
    elif headerless_columns is not None and len(first) == len(headerless_columns):
      names, first_is_data = list(headerless_columns), True
    else:
      raise DataError(f"{location(path, 1)}: header lacks columns "
                      f"{[c for c in columns if c not in first]}; expected "
                      f"columns {list(columns)}, got {first}")
    if first_is_data:
      yield 1, dict(zip(names, first))
    for values in reader:
      if not values:
        continue
      if len(values) != len(names):
        raise DataError(f"{location(path, reader.line_num)}: expected "
                        f"{len(names)} fields ({', '.join(names)}), got {values}")
      yield reader.line_num, dict(zip(names, values))


def parse_number(text: str, kind: type, where: str, field: str):
  """``kind(text)`` with an error naming ``where`` and ``field``."""
  try:
    return kind(text)
  except ValueError:
    raise DataError(f"{where}: field {field!r} = {text!r} is not a valid "
                    f"{kind.__name__}") from None


def decode_image(path: pathlib.Path, mode: str,
                 where: str | None = None) -> np.ndarray:
  """Decodes an image file to uint8 ``[H, W, C]`` in Pillow ``mode`` ('L' or 'RGB')."""
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert(mode))
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{where or path}: cannot decode image {path} ({e}); "
                    "expected a readable JPEG/PNG/BMP/TIFF file") from None
  return array[..., None] if array.ndim == 2 else array


def check_image_size(image: np.ndarray, height: int, width: int, where: str):
  if image.shape[:2] != (height, width):
    raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]} "
                    f"(width x height); expected {width}x{height}")


def crop_and_resize(image: np.ndarray, box: tuple[float, float, float, float],
                    size: int) -> np.ndarray:
  """Crops ``box`` = (left, top, right, bottom), zero-padding outside the image, to ``size``²."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  left, top, right, bottom = (int(round(v)) for v in box)
  resized = pil.crop((left, top, right, bottom)).resize(
      (size, size), Image.Resampling.BILINEAR)
  array = np.asarray(resized)
  return array[..., None] if array.ndim == 2 else array


def center_square(height: int, width: int) -> tuple[int, int, int, int]:
  """The largest centred square as a (left, top, right, bottom) box."""
  side = min(height, width)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def image_feature(shape: tuple[int, int, int], encoding: str):
  """The TFDS feature storing uint8 images of ``shape`` as ``encoding`` (see IMAGE_ENCODINGS)."""
  if encoding == "raw":
    return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                encoding=tfds.features.Encoding.BYTES)
  if encoding in ("png", "jpeg"):
    return tfds.features.Image(shape=shape, encoding_format=encoding)
  raise ValueError(f"image encoding {encoding!r} is not one of {IMAGE_ENCODINGS}")


def encode_image(image: np.ndarray, encoding: str):
  """The value ``image_feature(image.shape, encoding)`` stores."""
  if encoding == "raw":
    return image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  if encoding == "jpeg":
    pil.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  else:
    pil.save(buffer, format="PNG")
  return buffer.getvalue()
