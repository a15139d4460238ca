"""Procedurally rendered faces: the embedded default dataset.

With nothing downloaded, every config still trains on real pixels: grey 48x48
faces (the FER2013 format) whose expression is carried by the same cues humans
read (FACS-style action units, coarsely):

  * mouth: corner curvature (AU12 smile / AU15 frown), opening (AU25-27),
    asymmetry (AU10 upper-lip raise, disgust);
  * brows: height (AU1+2 raise / AU4 lower) and the inner-end angle (AU4 anger
    "V", AU1 sadness and fear);
  * eyes: openness (AU5 wide in surprise/fear, AU6-7 squint in joy/disgust);
  * nose wrinkle lines (AU9, disgust).

Each face also varies in identity (face shape, feature spacing, skin tone),
pose (roll, yaw as a feature shift, scale, translation; the face fills the
frame as in FER2013's tight crops), lighting (a linear
gradient and global gain), expression intensity and pixel noise, so the task
is learnable but not trivial. Every image carries a valence/arousal ground
truth: its class centroid on Russell's circumplex scaled by its intensity plus
small noise, so the regression (V/A) paths train on the default dataset too.
Generation is deterministic in (seed, split).
"""
import numpy as np

from fer_jax.data import classes
from fer_jax.data.base import ArraySplit, DATASETS, Dataset

IMAGE_SIZE = 48

# Offsets from the neutral face per class, at full intensity. Columns:
# mouth_curve (+ = corners up), mouth_open, mouth_asym, brow_raise (+ = up),
# brow_tilt (+ = inner ends down), eye_open (multiplier - 1), nose_wrinkle.
_EXPRESSION_OFFSETS = {
    "angry":    (-0.5, 0.15, 0.0, -1.5, 1.0, -0.25, 0.0),
    "disgust":  (-0.6, 0.0, 0.8, -1.0, 0.3, -0.45, 1.0),
    "fear":     (-0.4, 0.5, 0.0, 1.5, -0.8, 0.5, 0.0),
    "happy":    (1.0, 0.3, 0.0, 0.2, 0.0, -0.35, 0.0),
    "sad":      (-1.0, 0.0, 0.0, 0.3, -1.0, -0.2, 0.0),
    "surprise": (0.0, 1.0, 0.0, 2.2, 0.0, 0.6, 0.0),
    "neutral":  (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
}

# Valence/arousal centroids in [-1, 1]^2 (Russell 1980; the placement used by
# AffectNet-trained V/A models).
_VALENCE_AROUSAL = {
    "angry": (-0.6, 0.7), "disgust": (-0.7, 0.3), "fear": (-0.6, 0.8),
    "happy": (0.8, 0.4), "sad": (-0.7, -0.4), "surprise": (0.2, 0.8),
    "neutral": (0.0, 0.0),
}

SPLIT_SIZES = {"train": 6000, "validation": 1000, "test": 1400}
_SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


def _soft(distance):
  """Anti-aliased coverage of a shape from its signed distance in pixels."""
  return np.clip(0.5 - distance, 0.0, 1.0)


def _ellipse_distance(u, v, cx, cy, rx, ry):
  radius = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
  return (radius - 1.0) * np.minimum(rx, ry)


def _segment_distance(u, v, x0, y0, x1, y1):
  dx, dy = x1 - x0, y1 - y0
  t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
  return np.hypot(u - (x0 + t * dx), v - (y0 + t * dy))


def _eyes_and_brows(params, fx, v, px, col):
  """(ink, white): dark strokes of irises, lids and brows, and the sclera."""
  eye_dx, eye_y = col(params["eye_spacing"]), col(-5.0 + params["eye_height"])
  eye_open = col(1.0 + params["eye_open"])
  brow_raise, brow_tilt = col(params["brow_raise"]), col(params["brow_tilt"])
  ink = np.zeros_like(v)   # dark strokes: brows, lids, lips, wrinkles
  white = np.zeros_like(v)  # sclera
  for side in (-1.0, 1.0):
    ex = side * eye_dx
    sclera = _ellipse_distance(fx, v, ex, eye_y, 3.2, 1.9 * eye_open)
    white = np.maximum(white, _soft(sclera / px))
    iris = _ellipse_distance(fx, v, ex, eye_y, 1.3, np.minimum(1.3, 1.9 * eye_open))
    ink = np.maximum(ink, _soft(iris / px))
    ink = np.maximum(ink, 0.6 * _soft((np.abs(sclera) - 0.35) / px))
    inner, outer = ex - side * 3.2, ex + side * 3.8
    brow_y = eye_y - 4.2 - brow_raise
    brow = _segment_distance(fx, v, inner, brow_y + brow_tilt, outer, brow_y - 0.3 * brow_tilt)
    ink = np.maximum(ink, _soft((brow - 0.75) / px))
  return ink, white


def _render(params: dict[str, np.ndarray], rng: np.random.Generator):
  """Renders a batch of faces; every entry of ``params`` has shape [N]."""
  n = len(params["mouth_curve"])
  col = lambda a: np.asarray(a, np.float32)[:, None, None]
  grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
  x, y = np.meshgrid(grid, grid)
  x, y = x[None], y[None]

  # Face-local coordinates: undo translation, roll and scale.
  cx, cy = col(24 + params["shift_x"]), col(25 + params["shift_y"])
  cos, sin = np.cos(col(params["roll"])), np.sin(col(params["roll"]))
  scale = col(params["scale"])
  u = ((x - cx) * cos + (y - cy) * sin) / scale
  v = (-(x - cx) * sin + (y - cy) * cos) / scale
  px = 1.0 / scale  # one output pixel in face-local units

  face_rx, face_ry = col(params["face_width"]), col(params["face_height"])
  face = _soft(_ellipse_distance(u, v, 0.0, 0.0, face_rx, face_ry) / px)
  fx = u - col(params["yaw"])  # features slide sideways with yaw

  ink, white = _eyes_and_brows(params, fx, v, px, col)

  nose = _segment_distance(fx, v, 0.0, -1.5, 0.0, 4.0)
  ink = np.maximum(ink, 0.45 * _soft((nose - 0.45) / px))
  wrinkle = col(params["nose_wrinkle"])
  for side in (-1.0, 1.0):
    line = _segment_distance(fx, v, side * 1.2, -0.5, side * 3.0, 2.0)
    ink = np.maximum(ink, 0.7 * wrinkle * _soft((line - 0.4) / px))

  # Mouth: a parabola whose corners bend with the curve, tilted by asymmetry.
  mouth_w, mouth_y = col(params["mouth_width"]), col(10.0 + params["mouth_height"])
  across = np.clip((fx / mouth_w), -1.0, 1.0)
  inside = np.abs(fx) <= mouth_w
  centre = (mouth_y - 3.0 * col(params["mouth_curve"]) * across**2
            - 1.5 * col(params["mouth_asym"]) * across)
  opening = 3.2 * col(params["mouth_open"]) * np.sqrt(1.0 - across**2)
  lips = np.where(inside, np.abs(v - centre) - np.maximum(opening, 0.6), 9.0)
  ink = np.maximum(ink, _soft(lips / px))
  cavity = inside & (np.abs(v - centre) < opening)

  skin = col(params["skin"]) * (1.0 + col(params["light_slope"]) * u / 20.0)
  image = col(params["background"]) * (1.0 + 0.1 * (y - 24) / 24)
  image = image * (1 - face) + skin * face
  image = image * (1 - white * face) + 235.0 * white * face
  image = image * (1 - ink * face) + 35.0 * ink * face
  image = np.where(cavity & (face > 0.5), 15.0, image)
  image = image * col(params["gain"]) + rng.normal(0, 7.0, (n, IMAGE_SIZE, IMAGE_SIZE))
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)[..., None]


def _sample_params(labels: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
  n = len(labels)
  intensity = rng.uniform(0.6, 1.0, n)
  offsets = np.array([_EXPRESSION_OFFSETS[c] for c in classes.FER7], np.float32)[labels]
  offsets = offsets * intensity[:, None] + rng.normal(0, 0.08, offsets.shape)
  names = ("mouth_curve", "mouth_open", "mouth_asym", "brow_raise", "brow_tilt",
           "eye_open", "nose_wrinkle")
  params = {name: offsets[:, i] for i, name in enumerate(names)}
  params["mouth_open"] = np.clip(params["mouth_open"], 0.0, None)
  params["nose_wrinkle"] = np.clip(params["nose_wrinkle"], 0.0, 1.0)
  params["eye_open"] = np.clip(params["eye_open"], -0.7, None)
  params.update(
      shift_x=rng.normal(0, 1.5, n), shift_y=rng.normal(0, 1.5, n),
      roll=rng.normal(0, 0.12, n), scale=rng.uniform(1.1, 1.4, n),
      yaw=rng.normal(0, 1.2, n),
      face_width=rng.uniform(14, 18, n), face_height=rng.uniform(18, 22, n),
      eye_spacing=rng.uniform(5.5, 7.0, n), eye_height=rng.normal(0, 0.8, n),
      mouth_width=rng.uniform(4.5, 6.5, n), mouth_height=rng.normal(0, 0.8, n),
      skin=rng.uniform(110, 210, n), light_slope=rng.normal(0, 0.25, n),
      background=rng.uniform(20, 235, n), gain=rng.uniform(0.75, 1.2, n))
  centroids = np.array([_VALENCE_AROUSAL[c] for c in classes.FER7], np.float32)[labels]
  va = np.clip(centroids * intensity[:, None] + rng.normal(0, 0.08, centroids.shape), -1, 1)
  return params, va.astype(np.float32)


def generate(split: str, size: int | None = None, seed: int = 0) -> ArraySplit:
  """Renders ``size`` faces of ``split`` (balanced classes), deterministically."""
  if split not in _SPLIT_STREAMS:
    raise KeyError(f"synthetic_faces has no split {split!r}; splits: {', '.join(_SPLIT_STREAMS)}")
  size = SPLIT_SIZES[split] if size is None else size
  rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
  labels = rng.permutation(np.arange(size) % len(classes.FER7))
  params, va = _sample_params(labels, rng)
  images = np.concatenate([
      _render({k: v[i:i + 500] for k, v in params.items()}, rng)
      for i in range(0, size, 500)])
  return ArraySplit({
      "image": images, "label": labels.astype(np.int32),
      "valence": va[:, 0], "arousal": va[:, 1],
      "index": np.arange(size, dtype=np.int64)})


@DATASETS.register("synthetic_faces")
def load(cfg) -> Dataset:
  """Config fields: ``seed`` (0) and ``split_sizes`` (dict, optional)."""
  seed = cfg.get("seed", 0)
  sizes = dict(SPLIT_SIZES, **dict(cfg.get("split_sizes", None) or {}))
  return Dataset(
      name="synthetic_faces", class_names=classes.FER7,
      splits={s: generate(s, sizes[s], seed) for s in _SPLIT_STREAMS})
