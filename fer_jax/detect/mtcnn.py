"""MTCNN face detector in JAX/Flax, with the weights of the ``mtcnn`` wheel.

K. Zhang, Z. Zhang, Z. Li, Y. Qiao, "Joint Face Detection and Alignment Using
Multitask Cascaded Convolutional Networks", IEEE SPL 23(10), 2016. Three
networks in a cascade: P-Net slides over an image pyramid and proposes
windows, R-Net rescores and refines them on 24x24 crops, O-Net on 48x48 crops
and adds 5 landmarks; non-maximum suppression (NMS) after each stage.

Port of ``mtcnn`` 1.0.0 (ipazc/mtcnn, MIT licence, Ivan de Paz Centeno), read
from its wheel: ``network/{pnet,rnet,onet}.py`` for the layers, ``stages/`` and
``utils/`` for the pipeline. What the port keeps from it:

* Input: RGB, ``(x - 127.5) / 128``, then per pyramid level
  ``tf.image.resize(method=AREA)`` to ``int(side * scale)`` (TF casts the float
  size to int32, i.e. truncates). Pyramid scales ``(12 / min_face_size) *
  0.709 ** k``. We resize the raw values and normalise after (both linear) and
  compute AREA with an integer prefix sum (see ``_area_from_prefix``); it
  agrees with TF's overlap-weighted mean within 0.002 grey levels.
* Layers: 'valid' convolutions each followed by a PReLU with one slope per
  channel; TF 'same' or 'valid' max-pooling as in the Keras code. Before the
  first Dense layer of R-Net/O-Net the Keras code permutes H and W
  (``Permute((2, 1, 3))``) and then flattens, an order the dense kernels were
  exported in, so we do the same.
* P-Net proposals: a 12 px cell at stride 2, window ``[2i + 1, 2i + 12]``,
  regression scaled by 11 px and applied at once; per-level NMS (IoU 0.5),
  cross-level NMS (0.7), then boxes made square about their centre.
* R-Net/O-Net: crops by ``tf.image.crop_and_resize`` (bilinear; coordinates
  normalised by H and W but sampled on an (H - 1)/(W - 1) grid; samples off the
  image are 0, i.e. mid-grey after normalisation), offsets scaled by
  ``side + 1``, landmarks as ``side * l + corner - 1`` on the O-Net input box.
  Thresholds 0.6/0.7/0.8 (``threshold_onet`` defaults to 0.8 in 1.0.0, not the
  paper's 0.7); NMS 0.7 union after R-Net, 0.7 'min' (intersection over the
  smaller box) after O-Net. Final boxes clipped to ``[0, W - 1] x [0, H - 1]``.
* NMS is 1.0.0's matrix form: a box is dropped when it overlaps any
  higher-scoring box above the threshold, even one that was itself dropped
  (greedy NMS would keep it). It is fully vectorised and what the weights were
  used with by that package; the difference only shows on chains of boxes.

Deliberate differences:

* Pyramid depth. 1.0.0 takes ``round(-(log(min_side / 12) / log(0.709) + 1))``
  levels whatever ``min_face_size`` is, so for ``min_face_size`` above about 24
  the last levels fall below P-Net's 12 px input, TF raises and the package
  reports no faces. We keep every level whose short side is at least 12 px
  (Zhang et al.'s rule). For the default 20 px these are 1.0.0's levels, plus
  for a few frame sizes (e.g. a short side of 442-444 or 624-626 px) one more
  level of 12-13 px, i.e. faces close to the frame's short side.
* Batches: 1.0.0 pads frames of different sizes into one batch; here a batch
  is ``[N, H, W, 3]`` of one size, so no padding is involved.
* ``max_side``: frames whose longer side exceeds it are first area-resized
  down and the boxes mapped back, which trades the smallest faces for speed.

Weights: the wheel's ``mtcnn/assets/weights/{pnet,rnet,onet}.lz4`` are joblib
pickles of the Keras ``get_weights()`` lists (HWIO kernels, 496k parameters in
all). They are found through the installed distribution's metadata (the
package is never imported; its top level imports TensorFlow), unpickled once
and saved as ``$FER_JAX_CACHE/mtcnn-1.0.0.npz`` (default ``~/.cache/fer_jax``),
written to a temporary file and renamed into place; later runs read that file
with ``allow_pickle=False``. Nothing is downloaded.

Compilation: P-Net runs the whole pyramid in one jitted program per frame
batch shape; R-Net and O-Net get their candidates padded to a power of two
(at least 4), so a video of fixed frame size compiles a handful of programs
once. ``TRACE_COUNTS`` counts traces, for tests.

Speed: ``detect_batch`` on one 720x1280 frame with one face (a FER2013 face
pasted at 200 px on textured noise), median of 20 calls after warm-up, jax
0.10.2 on 2 CPU cores that a training job was using at the same time (load
average about 4), so an idle machine should do better:

  python -m fer_jax.detect.mtcnn --image PHOTO --min_face_size 80
  python -m fer_jax.detect.mtcnn --image PHOTO --max_side 640 ...

  min_face_size  max_side  ms/frame  fps   P-Net program (levels)
  80             -               62  16.0   43 ms (7)
  80             640             55  18.2   27 ms (7)
  60             640             59  17.1   34 ms (8)
  20 (default)   -              311   3.2  255 ms (11)
  20             640            143   7.0  112 ms (10)

A batch of 4 frames gave 19.8 frames/s at 80/640, little more than one.

The P-Net program dominates, and within it, for a webcam's 60-80 px faces,
the AREA resizes of the full frame into the pyramid (about 30 of its 40 ms at
``min_face_size=80``; the P-Net convolutions take 6 ms). R-Net and O-Net take
15-30 ms together (36-94 P-Net candidates here), NMS a few ms. ``max_side=640`` halves a 720p frame
exactly (a 2x2 mean) before the pyramid, which is the cheap speed-up; at 20
px it also raises the smallest face found to 24 px. The prefix sums of the
AREA resize became an ``associative_scan`` on 2026-12-05: the same frame at
``min_face_size=40`` on 2 AMD EPYC cores took 60.3 against 71.8 ms per frame
with ``jnp.cumsum`` (medians of six rounds alternating the two in one process,
each round the median of 15 calls; the scan was faster in five; identical
boxes). The shared cores are noisy: single runs of either ranged 55-84 ms.
(Writing the max-pools as maxima of strided slices instead of reduce_window
showed no difference outside that noise: 67.3 against 62.5 ms, the same way.)
"""
import collections
import dataclasses
import functools
import importlib.metadata
import os
import pathlib
import tempfile
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MTCNN_VERSION = "1.0.0"
NETS = ("pnet", "rnet", "onet")
# Keras layer names in the order of each model's get_weights() list; a PReLU
# owns one array (its slopes), a Conv2D/Dense two (kernel, bias).
LAYERS = {
    "pnet": ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3",
             "conv4_1", "conv4_2"),
    "rnet": ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "fc4",
             "prelu4", "fc5_1", "fc5_2"),
    "onet": ("conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4",
             "prelu4", "fc5", "prelu5", "fc6_1", "fc6_2", "fc6_3"),
}
PNET_MIN_SIDE = 12  # P-Net's receptive field: one output cell per 12x12 window
PNET_STRIDE = 2
MIN_BUCKET = 4
_QUANTUM = 256.0  # fixed-point steps per grey level in area_resize
TRACE_COUNTS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------- networks


class PReLU(nn.Module):
  """Keras PReLU with one slope per channel (``shared_axes=[1, 2]`` on maps)."""

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, alpha * x)


def _conv_prelu(x, features, kernel, index):
  x = nn.Conv(features, (kernel, kernel), padding="VALID",
              name=f"conv{index}")(x)
  return PReLU(name=f"prelu{index}")(x)


def _keras_flatten(x):
  """Keras ``Permute((2, 1, 3))`` + ``Flatten``: W-major order on NHWC maps."""
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
  """Proposal network, fully convolutional: ``[N, H, W, 3]`` normalised RGB.

  Returns the box regression ``[N, h, w, 4]`` and the face probability
  ``[N, h, w]``, ``h = ceil((H - 2) / 2) - 4`` (TF's 'same' pooling).
  """

  @nn.compact
  def __call__(self, x):
    x = _conv_prelu(x, 10, 3, 1)
    x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = _conv_prelu(x, 16, 3, 2)
    x = _conv_prelu(x, 32, 3, 3)
    reg = nn.Conv(4, (1, 1), name="conv4_1")(x)
    logits = nn.Conv(2, (1, 1), name="conv4_2")(x)
    return reg, jax.nn.softmax(logits)[..., 1]


class RNet(nn.Module):
  """Refinement network on ``[B, 24, 24, 3]`` crops: regression, probability."""

  @nn.compact
  def __call__(self, x):
    x = _conv_prelu(x, 28, 3, 1)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = _conv_prelu(x, 48, 3, 2)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    x = _conv_prelu(x, 64, 2, 3)
    x = PReLU(name="prelu4")(nn.Dense(128, name="fc4")(_keras_flatten(x)))
    reg = nn.Dense(4, name="fc5_1")(x)
    logits = nn.Dense(2, name="fc5_2")(x)
    return reg, jax.nn.softmax(logits)[..., 1]


class ONet(nn.Module):
  """Output network on ``[B, 48, 48, 3]`` crops.

  Returns the regression ``[B, 4]``, landmarks ``[B, 10]`` (x1..x5 then
  y1..y5, as fractions of the input box) and the face probability ``[B]``.
  """

  @nn.compact
  def __call__(self, x):
    x = _conv_prelu(x, 32, 3, 1)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = _conv_prelu(x, 64, 3, 2)
    x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    x = _conv_prelu(x, 64, 3, 3)
    x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = _conv_prelu(x, 128, 2, 4)
    x = PReLU(name="prelu5")(nn.Dense(256, name="fc5")(_keras_flatten(x)))
    reg = nn.Dense(4, name="fc6_1")(x)
    landmarks = nn.Dense(10, name="fc6_2")(x)
    logits = nn.Dense(2, name="fc6_3")(x)
    return reg, landmarks, jax.nn.softmax(logits)[..., 1]


MODULES = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
INPUT_SIDES = {"pnet": PNET_MIN_SIDE, "rnet": 24, "onet": 48}


# ------------------------------------------------------------------ weights


def cache_file() -> pathlib.Path:
  """The converted weights: under ``$FER_JAX_CACHE`` or ``~/.cache/fer_jax``."""
  root = os.environ.get("FER_JAX_CACHE", "~/.cache/fer_jax")
  return pathlib.Path(root).expanduser() / f"mtcnn-{MTCNN_VERSION}.npz"


def wheel_weight_files() -> dict[str, pathlib.Path]:
  """The installed wheel's ``.lz4`` files, via metadata (no import)."""
  try:
    dist = importlib.metadata.distribution("mtcnn")
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        f"MTCNN weights: no converted cache and the 'mtcnn' package is not "
        f"installed; pip install mtcnn=={MTCNN_VERSION} (no TensorFlow "
        f"needed)") from e
  if dist.version != MTCNN_VERSION:
    raise ValueError(f"MTCNN weights: need mtcnn=={MTCNN_VERSION}, "
                     f"found {dist.version}")
  files = {n: pathlib.Path(dist.locate_file(f"mtcnn/assets/weights/{n}.lz4"))
           for n in NETS}
  missing = [str(p) for p in files.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"MTCNN weights: missing {missing}")
  return files


def convert_weights(out_file: os.PathLike) -> pathlib.Path:
  """Unpickles the wheel's weights (the only unpickling) into an ``.npz``.

  Keys are ``'{net}/{i:02d}'`` in Keras ``get_weights()`` order. The file is
  written beside its target and renamed over it, so a reader never sees a
  partial file and two concurrent conversions leave one whole file.

  Args:
    out_file: the ``.npz`` to write.

  Returns:
    ``out_file`` as a path.
  """
  import joblib  # pylint: disable=import-outside-toplevel

  out_file = pathlib.Path(out_file)
  arrays = {}
  for net, path in wheel_weight_files().items():
    for i, a in enumerate(joblib.load(path)):
      arrays[f"{net}/{i:02d}"] = np.asarray(a, np.float32)
  out_file.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_file.parent, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, out_file)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_file


def load_weight_arrays(weights_file: os.PathLike | None = None
                       ) -> dict[str, list[np.ndarray]]:
  """The Keras-ordered arrays per net, converting the wheel on first use."""
  path = pathlib.Path(weights_file) if weights_file else cache_file()
  if not path.is_file():
    convert_weights(path)
  with np.load(path, allow_pickle=False) as data:
    keys = sorted(data.files)
    return {n: [data[k] for k in keys if k.startswith(f"{n}/")] for n in NETS}


def to_variables(net: str, arrays: Sequence[np.ndarray]) -> dict:
  """Maps a Keras weight list onto the Flax params of ``MODULES[net]``.

  Strict: the count and every shape must match the module's own init.
  """
  arrays = list(arrays)
  params = {}
  for layer in LAYERS[net]:
    if layer.startswith("prelu"):
      params[layer] = {"alpha": arrays.pop(0).reshape(-1)}
    else:
      params[layer] = {"kernel": arrays.pop(0), "bias": arrays.pop(0)}
  if arrays:
    raise ValueError(f"{net}: {len(arrays)} weight arrays left over")
  side = INPUT_SIDES[net]
  expected = jax.eval_shape(
      MODULES[net].init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))["params"]
  got = jax.tree.map(lambda a: a.shape, params)
  want = jax.tree.map(lambda a: a.shape, expected)
  if got != want:
    raise ValueError(f"{net}: weight shapes {got} != module's {want}")
  return {"params": jax.tree.map(jnp.asarray, params)}


# -------------------------------------------------------------- image ops


def area_boundaries(in_size: int, out_size: int):
  """Input positions of the output pixel edges of TF's AREA resize on one axis.

  Output pixel ``k`` averages the input over ``[k * s, (k + 1) * s)``,
  ``s = in_size / out_size``, each input pixel weighted by its overlap (TF's
  ``resize_area_op``, half-open pixels, no centre offset).

  Returns:
    ``(index [out + 1] int32, fraction [out + 1] float32, s)``: edge ``k`` is
    at ``index[k] + fraction[k]``.
  """
  s = in_size / out_size
  edges = np.arange(out_size + 1) * s
  index = np.minimum(np.floor(edges), in_size).astype(np.int64)
  fraction = np.where(index >= in_size, 0.0, edges - index)
  return index.astype(np.int32), fraction.astype(np.float32), s


def _fixed_point_prefix(x: jax.Array, axis: int):
  """Pixel values as int32 fixed point and their prefix sum along ``axis``.

  The sum is a log-depth ``associative_scan``: ``jnp.cumsum`` lowers to a
  reduce_window over the whole axis, which XLA:CPU ran 1.4x (along W) to 3.8x
  (along H) slower on a 720p frame. Integer sums are exact in any order.
  """
  q = jnp.round(x * _QUANTUM).astype(jnp.int32)
  zero = jnp.zeros_like(jax.lax.slice_in_dim(q, 0, 1, axis=axis))
  prefix = jax.lax.associative_scan(jnp.add, q, axis=axis)
  return q, jnp.concatenate([zero, prefix], axis=axis)


def _area_from_prefix(q: jax.Array, prefix: jax.Array, axis: int,
                      out_size: int) -> jax.Array:
  """AREA resize along one axis from ``_fixed_point_prefix``'s output.

  An output pixel is (integral at its right edge - integral at its left edge)
  / s, an integral being a prefix sum plus a fraction of the next pixel. The
  prefix sum is int32 fixed point (1/256 of a grey level: exact for uint8
  input, within 0.002 grey levels after the first axis; sides up to 32k px),
  so the difference of two large sums is exact, where a float32 prefix sum
  over 1280 pixels would be off by tenths of a grey level. On a 720p frame
  this was 6x faster than gathering the taps of every output pixel and
  weighting them (XLA:CPU runs that gather element by element).
  """
  in_size = q.shape[axis]
  index, fraction, s = area_boundaries(in_size, out_size)
  whole = jnp.take(prefix, jnp.asarray(index), axis=axis)
  pixel = jnp.take(q, jnp.asarray(np.minimum(index, in_size - 1)), axis=axis)
  shape = [1] * q.ndim
  shape[axis] = -1
  part = pixel.astype(jnp.float32) * jnp.asarray(fraction).reshape(shape)

  def span(a):  # right edge minus left edge
    return (jax.lax.slice_in_dim(a, 1, out_size + 1, axis=axis)
            - jax.lax.slice_in_dim(a, 0, out_size, axis=axis))

  return (span(whole).astype(jnp.float32) + span(part)) / (s * _QUANTUM)


def _area_whole_factor(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """AREA resize by an integer factor: the mean of each run of pixels."""
  factor = x.shape[axis] // out_size
  shape = x.shape[:axis] + (out_size, factor) + x.shape[axis + 1:]
  return x.reshape(shape).mean(axis=axis + 1)


def area_resize_many(images: jax.Array, shapes: Sequence[tuple[int, int]]
                     ) -> list[jax.Array]:
  """``tf.image.resize(..., method=AREA)`` of ``[N, H, W, C]`` pixel values
  (0-255) to each of ``shapes``; the prefix sum over H is shared."""
  rows = None
  out = []
  for h, w in shapes:
    x = images
    if h != x.shape[1] and x.shape[1] % h == 0:
      x = _area_whole_factor(x, 1, h)
    elif h != x.shape[1]:
      if rows is None:
        rows = _fixed_point_prefix(images, 1)
      x = _area_from_prefix(*rows, 1, h)
    if w != x.shape[2] and x.shape[2] % w == 0:
      x = _area_whole_factor(x, 2, w)
    elif w != x.shape[2]:
      x = _area_from_prefix(*_fixed_point_prefix(x, 2), 2, w)
    out.append(x)
  return out


def area_resize(images: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """``area_resize_many`` to one shape."""
  if tuple(shape) == images.shape[1:3]:
    return images
  return area_resize_many(images, [shape])[0]


def crop_and_resize(images: jax.Array, boxes: jax.Array, frame: jax.Array,
                    side: int) -> jax.Array:
  """``tf.image.crop_and_resize`` (bilinear, extrapolation 0).

  Args:
    images: ``[N, H, W, C]``.
    boxes: ``[B, 4]`` normalised ``(y1, x1, y2, x2)``: pixel coordinates over
      H or W, as mtcnn passes them.
    frame: ``[B]`` image index of each box.
    side: output side.

  Returns:
    ``[B, side, side, C]``; rows/columns sampled off the image are 0.
  """
  _, h, w, _ = images.shape
  steps = jnp.arange(side, dtype=jnp.float32)

  def grid(lo, hi, size):
    step = (hi - lo) * (size - 1) / (side - 1)
    pos = lo[:, None] * (size - 1) + steps * step[:, None]
    low = jnp.floor(pos)
    inside = (pos >= 0) & (pos <= size - 1)
    low_i = jnp.clip(low, 0, size - 1).astype(jnp.int32)
    high_i = jnp.clip(jnp.ceil(pos), 0, size - 1).astype(jnp.int32)
    return low_i, high_i, pos - low, inside

  y0, y1, fy, in_y = grid(boxes[:, 0], boxes[:, 2], h)
  x0, x1, fx, in_x = grid(boxes[:, 1], boxes[:, 3], w)
  f = frame[:, None, None]

  def at(yi, xi):
    return images[f, yi[:, :, None], xi[:, None, :]]

  fx_ = fx[:, None, :, None]
  top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * fx_
  bottom = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * fx_
  out = top + (bottom - top) * fy[:, :, None, None]
  inside = in_y[:, :, None, None] & in_x[:, None, :, None]
  return jnp.where(inside, out, 0.0)


# -------------------------------------------------------- jitted programs


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shapes of one frame size: the jit cache key of P-Net's program.

  Attributes:
    frame_shape: ``(H, W)`` of the input frames.
    work_shape: ``(H, W)`` after the ``max_side`` downscale.
    scales: pyramid scales relative to ``work_shape``.
    level_shapes: ``(h, w)`` of each pyramid level.
  """
  frame_shape: tuple[int, int]
  work_shape: tuple[int, int]
  scales: tuple[float, ...]
  level_shapes: tuple[tuple[int, int], ...]


def make_plan(frame_shape: tuple[int, int], min_face_size: float,
              scale_factor: float, max_side: int | None) -> Plan:
  """The pyramid of mtcnn 1.0.0, stopped before levels under 12 px.

  With ``max_side`` the frame is first shrunk to fit it and the pyramid never
  upsamples the shrunk frame, so the smallest face found is
  ``max(min_face_size, 12 * H / H_work)`` input pixels.
  """
  h, w = frame_shape
  shrink = min(1.0, max_side / max(h, w)) if max_side else 1.0
  work = (max(1, int(round(h * shrink))), max(1, int(round(w * shrink))))
  # min_face_size is in input-frame pixels; on the work image it shrinks too.
  first = PNET_MIN_SIDE / (min_face_size * work[1] / w)
  if work != (h, w):
    first = min(first, 1.0)  # upsampling the downscaled frame would undo it
  scales, shapes = [], []
  scale = first
  while min(int(work[0] * scale), int(work[1] * scale)) >= PNET_MIN_SIDE:
    scales.append(scale)
    shapes.append((int(work[0] * scale), int(work[1] * scale)))
    scale *= scale_factor
  return Plan(tuple(frame_shape), work, tuple(scales), tuple(shapes))


def normalise(x):
  """mtcnn's input scaling: pixel values to about [-1, 1]."""
  return (x - 127.5) / 128.0


@functools.partial(jax.jit, static_argnames=("plan",))
def pnet_program(variables, frames, plan: Plan):
  """Normalises uint8 frames ``[N, H, W, 3]`` and runs P-Net on every level.

  Returns:
    The normalised work images (for the crops of the later stages) and a
    tuple of ``(regression, probability)`` per level.
  """
  TRACE_COUNTS["pnet"] += 1
  x = area_resize(frames.astype(jnp.float32), plan.work_shape)
  # mtcnn normalises before resizing; both are linear, so resizing the raw
  # values first (which area_resize's fixed point wants) gives the same input.
  maps = tuple(MODULES["pnet"].apply(variables, normalise(level))
               for level in area_resize_many(x, plan.level_shapes))
  return normalise(x), maps


@functools.partial(jax.jit, static_argnames=("net",))
def refine_program(variables, images, boxes, frame, net: str):
  """Crops ``boxes`` from ``images`` and runs R-Net or O-Net on them."""
  TRACE_COUNTS[net] += 1
  side = INPUT_SIDES[net]
  crops = crop_and_resize(images, boxes, frame, side)
  return MODULES[net].apply(variables, crops)


# --------------------------------------------------------- box arithmetic
# Rows are float64 [M, 6 or 16]: frame, x1, y1, x2, y2, score, then for
# O-Net's output the landmarks x1..x5, y1..y5 (mtcnn 1.0.0's layout).


def pnet_proposals(reg: np.ndarray, prob: np.ndarray, scale: float,
                   threshold: float) -> np.ndarray:
  """Windows of one level with probability above ``threshold``, best first.

  mtcnn 1.0.0's ``generate_bounding_box`` + ``upscale_bboxes``: the window of
  cell ``(i, j)`` is ``[2j + 1, 2j + 12]`` (x) by ``[2i + 1, 2i + 12]`` (y) on
  the level, regression in units of 11 px, then divided by the scale.
  """
  frame, iy, ix = np.nonzero(prob > threshold)
  r = reg[frame, iy, ix].astype(np.float64)
  span = PNET_MIN_SIDE - 1
  lo_x, lo_y = PNET_STRIDE * ix + 1, PNET_STRIDE * iy + 1
  rows = np.stack([
      frame, lo_x + r[:, 0] * span, lo_y + r[:, 1] * span,
      lo_x + span + r[:, 2] * span, lo_y + span + r[:, 3] * span,
      prob[frame, iy, ix]], axis=1).astype(np.float64)
  rows[:, 1:5] /= scale
  return rows[np.argsort(rows[:, 5])[::-1]]


def pairwise_overlap(a: np.ndarray, b: np.ndarray, method: str) -> np.ndarray:
  """``[len(a), len(b)]`` IoU ('union') or intersection / smaller area."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  low = np.maximum(a[:, None, :2], b[None, :, :2])
  high = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.maximum(high - low, 0), axis=-1)
  if method == "union":
    denominator = area_a[:, None] + area_b[None, :] - inter
  elif method == "min":
    denominator = np.minimum(area_a[:, None], area_b[None, :])
  else:
    raise ValueError(f"method must be 'union' or 'min', got {method!r}")
  with np.errstate(divide="ignore", invalid="ignore"):
    return inter / denominator


def matrix_nms(boxes: np.ndarray, threshold: float, method: str = "union",
               chunk: int = 2048) -> np.ndarray:
  """Indices kept by mtcnn 1.0.0's NMS of ``boxes`` sorted best first.

  Box j is dropped when any box i < j overlaps it above ``threshold``. The
  overlap matrix is built ``chunk`` columns at a time so that thousands of
  P-Net windows do not need an N x N matrix at once.
  """
  n = len(boxes)
  dropped = np.zeros(n, bool)
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    overlap = pairwise_overlap(boxes[:stop], boxes[start:stop], method)
    earlier = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]
    dropped[start:stop] = ((overlap > threshold) & earlier).any(axis=0)
  return np.flatnonzero(~dropped)


def nms_rows(rows: np.ndarray, threshold: float, method: str = "union",
             sort: bool = True) -> np.ndarray:
  """``smart_nms_from_bboxes``: NMS within each frame, rows grouped by frame."""
  if sort:
    rows = rows[np.argsort(rows[:, 5])[::-1]]
  kept = []
  for f in np.unique(rows[:, 0]):
    sub = rows[rows[:, 0] == f]
    kept.append(sub[matrix_nms(sub[:, 1:5], threshold, method)])
  return np.concatenate(kept) if kept else rows[:0]


def square(rows: np.ndarray) -> np.ndarray:
  """Grows the shorter side of each box to the longer one, about the centre."""
  rows = rows.copy()
  w, h = rows[:, 3] - rows[:, 1], rows[:, 4] - rows[:, 2]
  side = np.maximum(w, h)
  rows[:, 1] += (w - side) / 2
  rows[:, 2] += (h - side) / 2
  rows[:, 3] = rows[:, 1] + side
  rows[:, 4] = rows[:, 2] + side
  return rows


def apply_offsets(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """``adjust_bboxes``: corner offsets in units of ``side + 1``."""
  rows = rows.copy()
  w = rows[:, 3] - rows[:, 1] + 1
  h = rows[:, 4] - rows[:, 2] + 1
  rows[:, 1:5] += offsets * np.stack([w, h, w, h], axis=1)
  return rows


def place_landmarks(rows: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """``adjust_landmarks``: fractions of the O-Net input box to pixels."""
  w = rows[:, 3:4] - rows[:, 1:2] + 1
  h = rows[:, 4:5] - rows[:, 2:3] + 1
  return np.concatenate([w * landmarks[:, :5] + rows[:, 1:2] - 1,
                         h * landmarks[:, 5:] + rows[:, 2:3] - 1], axis=1)


def bucket(n: int) -> int:
  """Padded candidate count: the next power of two, at least ``MIN_BUCKET``."""
  return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def crop_inputs(rows: np.ndarray, work_shape: tuple[int, int]):
  """Normalised ``(y1, x1, y2, x2)`` and frame indices, padded to a bucket."""
  h, w = work_shape
  size = bucket(len(rows))
  boxes = np.zeros((size, 4), np.float32)
  boxes[:len(rows)] = rows[:, [2, 1, 4, 3]] / np.array([h, w, h, w])
  frame = np.zeros((size,), np.int32)
  frame[:len(rows)] = rows[:, 0]
  return boxes, frame


def to_frame_pixels(rows: np.ndarray, plan: Plan) -> np.ndarray:
  """Maps work-image rows back to the input frame and clips the boxes."""
  rows = rows.copy()
  (h, w), (wh, ww) = plan.frame_shape, plan.work_shape
  sx, sy = w / ww, h / wh
  rows[:, [1, 3, 6, 7, 8, 9, 10]] *= sx
  rows[:, [2, 4, 11, 12, 13, 14, 15]] *= sy
  rows[:, [1, 3]] = np.clip(rows[:, [1, 3]], 0, w - 1)
  rows[:, [2, 4]] = np.clip(rows[:, [2, 4]], 0, h - 1)
  return rows


def rows_to_faces(rows: np.ndarray, num_frames: int) -> list[list[dict]]:
  """Per-frame lists of ``{'box', 'score', 'landmarks'}``, best first."""
  faces = [[] for _ in range(num_frames)]
  for row in rows[np.argsort(rows[:, 5], kind="stable")[::-1]]:
    faces[int(row[0])].append({
        "box": tuple(float(v) for v in row[1:5]),
        "score": float(row[5]),
        "landmarks": np.stack([row[6:11], row[11:16]], axis=1),
    })
  return faces


# ---------------------------------------------------------------- detector


def as_rgb_batch(frames) -> np.ndarray:
  """``[N, H, W]`` or ``[N, H, W, 1|3|4]`` -> ``[N, H, W, 3]``.

  Grey is replicated to three channels; an alpha channel is dropped.
  """
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[..., None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected [N, H, W(, 1|3|4)] frames, got {frames.shape}")
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)
  return frames[..., :3]


class MTCNN:
  """Face detector: ``MTCNN()(image)`` or ``MTCNN().detect_batch(frames)``.

  Weights load on first use. Each face is a dict: ``box`` ``(x0, y0, x1, y1)``
  floats in input pixels, ``score`` (O-Net's face probability) and
  ``landmarks`` ``[5, 2]`` (x, y) in mtcnn's order: left_eye, right_eye, nose,
  mouth_left, mouth_right ('left' = smaller x in the image).

  Attributes:
    min_face_size: smallest face side searched, in input pixels (20 as in
      mtcnn; 60-80 suits a webcam and is much faster).
    thresholds: P-Net, R-Net, O-Net probability thresholds.
    scale_factor: ratio of successive pyramid levels.
    max_side: if set, frames with a longer side are downscaled first.
    weights_file: converted ``.npz`` (default ``cache_file()``).
  """

  def __init__(self, min_face_size: float = 20.0,
               thresholds: Sequence[float] = (0.6, 0.7, 0.8),
               scale_factor: float = 0.709, max_side: int | None = None,
               weights_file: os.PathLike | None = None):
    self.min_face_size = float(min_face_size)
    self.thresholds = tuple(float(t) for t in thresholds)
    self.scale_factor = float(scale_factor)
    self.max_side = max_side
    self.weights_file = weights_file

  @functools.cached_property
  def variables(self) -> dict:
    arrays = load_weight_arrays(self.weights_file)
    return {net: to_variables(net, arrays[net]) for net in NETS}

  def plan(self, frame_shape: tuple[int, int]) -> Plan:
    return make_plan(frame_shape, self.min_face_size, self.scale_factor,
                     self.max_side)

  def __call__(self, image) -> list[dict]:
    """Faces in one ``[H, W, 3]`` RGB (or ``[H, W(, 1)]`` grey) image."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"expected [H, W(, 1|3|4)], got {image.shape}")
    return self.detect_batch(image[None])[0]

  def detect_batch(self, frames) -> list[list[dict]]:
    """Faces per frame of ``[N, H, W, 3]`` uint8 RGB frames.

    Grey batches are ``[N, H, W]`` or ``[N, H, W, 1]`` (so a single
    ``[H, W, 3]`` image must go through ``__call__``). One jitted P-Net
    program per ``(N, H, W)``: keep N fixed for video, padding the last batch.
    """
    frames = as_rgb_batch(frames)
    plan = self.plan(frames.shape[1:3])
    empty = [[] for _ in range(len(frames))]
    if not plan.scales:
      return empty
    images, maps = pnet_program(self.variables["pnet"], frames, plan)
    rows = self._pnet_stage(jax.device_get(maps), plan)
    for stage in (self._rnet_stage, self._onet_stage):
      if not len(rows):
        return empty
      rows = stage(images, rows, plan)
    return rows_to_faces(to_frame_pixels(rows, plan), len(frames))

  def _pnet_stage(self, maps, plan: Plan) -> np.ndarray:
    levels = []
    for (reg, prob), scale in zip(maps, plan.scales):
      rows = pnet_proposals(np.asarray(reg), np.asarray(prob), scale,
                            self.thresholds[0])
      levels.append(nms_rows(rows, 0.5, sort=False))
    return square(nms_rows(np.concatenate(levels), 0.7))

  def _refine(self, net, images, rows, plan):
    boxes, frame = crop_inputs(rows, plan.work_shape)
    outputs = refine_program(self.variables[net], images, jnp.asarray(boxes),
                             jnp.asarray(frame), net=net)
    return [np.asarray(o)[:len(rows)] for o in jax.device_get(outputs)]

  def _rnet_stage(self, images, rows, plan: Plan) -> np.ndarray:
    reg, prob = self._refine("rnet", images, rows, plan)
    rows = apply_offsets(rows, reg)
    rows[:, 5] = prob
    rows = rows[prob > self.thresholds[1]]
    return square(nms_rows(rows, 0.7))

  def _onet_stage(self, images, rows, plan: Plan) -> np.ndarray:
    reg, landmarks, prob = self._refine("onet", images, rows, plan)
    points = place_landmarks(rows, landmarks)
    rows = apply_offsets(rows, reg)
    rows[:, 5] = prob
    rows = np.concatenate([rows, points], axis=1)[prob > self.thresholds[2]]
    return nms_rows(rows, 0.7, method="min")


@functools.lru_cache(maxsize=1)
def default_detector() -> MTCNN:
  return MTCNN()


def detect_faces(image, **kwargs) -> list[dict]:
  """Faces in one image, by a shared default ``MTCNN`` or one built from
  ``kwargs`` (a new one compiles its programs again)."""
  detector = MTCNN(**kwargs) if kwargs else default_detector()
  return detector(image)


# ---------------------------------------------------------------- benchmark


def benchmark(detector: MTCNN, frame: np.ndarray, repeats: int = 20) -> dict:
  """Milliseconds per frame of ``detect_batch`` on ``frame[None]`` and of its
  P-Net program alone (medians after one warm-up call), and the faces."""
  import time  # pylint: disable=import-outside-toplevel

  frames = as_rgb_batch(frame[None])
  plan = detector.plan(frames.shape[1:3])
  faces = detector.detect_batch(frames)[0]

  def median_ms(fn):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))

  total = median_ms(lambda: detector.detect_batch(frames))
  variables = detector.variables["pnet"]
  pnet = median_ms(lambda: pnet_program(variables, frames, plan))
  return {"total_ms": total, "fps": 1000 / total, "pnet_ms": pnet,
          "levels": len(plan.scales), "faces": faces}


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m fer_jax.detect.mtcnn --image PHOTO [--min_face_size 80]``."""
  import argparse  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--image", required=True,
                      help="a photo, resized to --size")
  parser.add_argument("--size", default="720x1280", help="HxW of the frame")
  parser.add_argument("--min_face_size", type=float, default=20.0)
  parser.add_argument("--max_side", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  h, w = (int(v) for v in args.size.split("x"))
  frame = np.asarray(Image.open(args.image).convert("RGB").resize((w, h)))
  detector = MTCNN(min_face_size=args.min_face_size, max_side=args.max_side)
  result = benchmark(detector, frame, args.repeats)
  print(f"{h}x{w} min_face_size={args.min_face_size:g} "
        f"max_side={args.max_side}: "
        f"{result['total_ms']:.0f} ms/frame ({result['fps']:.1f} fps), "
        f"P-Net program {result['pnet_ms']:.0f} ms over {result['levels']} "
        f"levels, {len(result['faces'])} face(s)")
  for face in result["faces"]:
    print("  box", np.round(face["box"], 1), "score", round(face["score"], 4))


if __name__ == "__main__":
  main()
