"""Synthetic occluders for aligned face crops, and the fixed occluded-test protocol.

Occlusion-robust FER (the setting of Chen et al., "Lightweight expression
recognition combined attention fusion network with hybrid knowledge
distillation for occluded e-learner facial images", Neurocomputing 2025) is
evaluated on real occlusion subsets (Occlusion-RAF-DB / -FERPlus / -AffectNet
of Wang et al., "Region Attention Networks for Pose and Occlusion Robust Facial
Expression Recognition", TIP 2020) and on synthetic occluders pasted on clean
test sets: random blocks over a fixed area fraction, eye bars / sunglasses and
face masks (e.g. the mask/eye stress test of ResidualMaskingNet on FER2013,
PMC9374580 Table 4). Their occluder geometry is not available to us, so every
shape here is a reconstruction [INFERRED]: the fractions are read off the
FER2013 mean face (eye row 0.365 H, nose highlight 0.50 H, nostrils 0.65 H,
mouth 0.80 H of the 48 px crop) and every one of them is a field of
``Geometry``.
docs/occlusion_protocol.md gives the full protocol.

Kinds (``KINDS``):
  * ``'eyes'``: a dark rounded band (eye bar / sunglasses) across the eye row,
    with a random vertical offset, height and tilt;
  * ``'mouth'``: a light surgical mask from the nose tip down to the chin, with
    a curved top edge, rounded jaw line and horizontal pleats;
  * ``'blocks'``: ``num_blocks`` axis-aligned rectangles, one in each of
    ``num_blocks`` equal strips cut along a random axis, so they never overlap
    and cover ``block_area`` of the image up to pixel rounding;
  * ``'hand'``: a palm, four fingers and a thumb (a union of ellipses) in a skin
    tone with texture noise, over the lower face or one side of the face.

``occlude`` draws fresh occluders for training; ``occlude_fixed`` is the test
protocol: each image's occluder is a function of (seed, kind, dataset index)
only, so any batch order or sharding gives the same pixels.

Everything is pure JAX on NHWC batches (one per-image function, vmapped over
per-image keys). Geometry is in fractions of the side of a square crop;
rendering is in pixels with a one-pixel anti-aliased edge, except blocks, whose
edges are snapped to whole pixels.
"""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

KINDS = ("eyes", "mouth", "blocks", "hand")
# Codes folded into the protocol key. They are part of the published protocol:
# never renumber them, only append.
_KIND_CODES = {"eyes": 0, "mouth": 1, "blocks": 2, "hand": 3, "random": 4}

# ITU-R BT.601 luma, to paint single-channel images with the grey level a
# greyscale conversion of the colour occluder would have.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Occluder shapes, as fractions of the side of a square aligned face crop.

  Pairs ``(lo, hi)`` are ranges sampled uniformly per image. The defaults are
  fitted to FER2013 crops; wider crops (RAF-DB aligned 100 px, AffectNet 224 px)
  place the eyes and mouth differently and should override the centres.
  """
  # Eye bar: centre row of the band, +- jitter, band height, width, tilt.
  eye_center_y: float = 0.37
  eye_jitter_y: float = 0.03
  eye_height: tuple[float, float] = (0.13, 0.20)
  eye_width: float = 0.84
  eye_jitter_x: float = 0.02
  eye_tilt_deg: float = 8.0
  eye_shade: tuple[float, float] = (0.0, 0.15)
  # Mask: top edge at the centre (nose tip), +- jitter; how much lower the top
  # edge sits at the mask's sides; width; bottom edge (chin) and its rise at
  # the sides (the jaw line).
  mask_top_y: float = 0.53
  mask_jitter_y: float = 0.03
  mask_top_curve: tuple[float, float] = (0.04, 0.10)
  mask_width: float = 0.76
  mask_jitter_x: float = 0.02
  mask_bottom_y: float = 1.0
  mask_bottom_curve: float = 0.10
  mask_pleats: int = 3
  # Blocks: total covered fraction, how many, width/height ratio range, fill.
  block_area: float = 0.25
  num_blocks: int = 2
  block_aspect: tuple[float, float] = (1 / 3, 3.0)
  block_fill: str = "black"
  # Hand: size relative to the default hand (_HAND_ELLIPSES); palm centre over
  # the mouth (fingers up) or, with probability hand_side_prob, at a cheek
  # (palm hand_side_x from the left or right edge, fingers pointing inwards);
  # random turn of the fingers; texture noise amplitude.
  hand_scale: tuple[float, float] = (0.9, 1.15)
  hand_lower_y: tuple[float, float] = (0.86, 0.98)
  hand_lower_x: tuple[float, float] = (0.38, 0.62)
  hand_side_prob: float = 0.5
  hand_side_y: tuple[float, float] = (0.55, 0.70)
  hand_side_x: float = 0.06
  hand_turn_deg: float = 25.0
  hand_noise: float = 0.06

  def __post_init__(self):
    # Ranges from configs arrive as lists; the jit cache needs hashable fields.
    for field in dataclasses.fields(self):
      if isinstance(getattr(self, field.name), list):
        object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
    if self.block_fill not in ("black", "noise"):
      raise ValueError(f"Geometry.block_fill must be 'black' or 'noise', "
                       f"got {self.block_fill!r}")
    if not 0.0 < self.block_area <= 1.0:
      raise ValueError(f"Geometry.block_area must be in (0, 1], got {self.block_area}")
    if self.num_blocks < 1:
      raise ValueError(f"Geometry.num_blocks must be >= 1, got {self.num_blocks}")
    for name in ("eye_height", "eye_shade", "mask_top_curve", "block_aspect",
                 "hand_scale", "hand_lower_y", "hand_lower_x", "hand_side_y"):
      lo, hi = getattr(self, name)
      if lo > hi:
        raise ValueError(f"Geometry.{name} must be a (lo, hi) range with lo <= hi, "
                         f"got {(lo, hi)}")


# A painter renders one occluder: (key, side, channels, geometry) ->
# (coverage [S, S] in [0, 1], paint [S, S, C] in [0, 1]).
Painter = Callable[[jax.Array, int, int, Geometry], tuple[jax.Array, jax.Array]]


def _pixel_grid(side: int) -> tuple[jax.Array, jax.Array]:
  """Row and column coordinates of the pixel centres, in pixels."""
  centres = jnp.arange(side, dtype=jnp.float32) + 0.5
  return centres[:, None], centres[None, :]


def _inside(signed_distance: jax.Array) -> jax.Array:
  """Coverage from a signed distance in pixels (negative inside): a 1 px ramp."""
  return jnp.clip(0.5 - signed_distance, 0.0, 1.0)


def _rotate(y, x, centre_y, centre_x, angle):
  """Coordinates in a frame centred at (centre_y, centre_x), rotated by angle."""
  dy, dx = y - centre_y, x - centre_x
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  along = dx * cos + dy * sin
  across = -dx * sin + dy * cos
  return along, across


def _colour(rgb: jax.Array, channels: int) -> jax.Array:
  """An RGB colour (last axis 3) as ``channels`` values (grey = luma)."""
  if channels == 1:
    return jnp.tensordot(rgb, jnp.asarray(_LUMA), axes=1)[..., None]
  return rgb


def draw_uniform(key: jax.Array, ranges) -> jax.Array:
  """One uniform value per ``(lo, hi)`` in ``ranges``, from a single draw.

  Every separate random draw compiles its own threefry hash; drawing all of a
  painter's scalars at once halves its compile time.
  """
  lo, hi = jnp.asarray(ranges, jnp.float32).T
  return lo + (hi - lo) * jax.random.uniform(key, (len(ranges),))


def _paint_eyes(key, side, channels, g: Geometry):
  dy, dx, height, tilt, shade = draw_uniform(key, [
      (-g.eye_jitter_y, g.eye_jitter_y), (-g.eye_jitter_x, g.eye_jitter_x),
      g.eye_height, (-g.eye_tilt_deg, g.eye_tilt_deg), g.eye_shade])
  y, x = _pixel_grid(side)
  half_height = 0.5 * side * height
  half_width = 0.5 * side * g.eye_width
  along, across = _rotate(y, x, side * (g.eye_center_y + dy), side * (0.5 + dx),
                          jnp.deg2rad(tilt))
  # Rounded-box signed distance; rounding the ends by most of the half height
  # makes the band read as glasses rather than a censor bar.
  radius = 0.8 * half_height
  qx = jnp.abs(along) - (half_width - radius)
  qy = jnp.abs(across) - (half_height - radius)
  outside = jnp.hypot(jnp.maximum(qx, 0.0), jnp.maximum(qy, 0.0))
  distance = outside + jnp.minimum(jnp.maximum(qx, qy), 0.0) - radius
  return _inside(distance), jnp.broadcast_to(shade, (side, side, channels))


def _paint_mouth(key, side, channels, g: Geometry):
  dy, dx, curve, tint, shade = draw_uniform(key, [
      (-g.mask_jitter_y, g.mask_jitter_y), (-g.mask_jitter_x, g.mask_jitter_x),
      g.mask_top_curve, (0.0, 1.0), (0.92, 1.0)])
  y, x = _pixel_grid(side)
  centre_x = side * (0.5 + dx)
  half_width = 0.5 * side * g.mask_width
  lateral = (x - centre_x) / half_width  # -1 .. 1 across the mask
  top = side * (g.mask_top_y + dy + curve * lateral**2)
  bottom = side * (g.mask_bottom_y - g.mask_bottom_curve * lateral**2)
  distance = jnp.maximum(jnp.maximum(top - y, y - bottom),
                         jnp.abs(x - centre_x) - half_width)
  # Pale blue to white, as surgical masks come; pleats darken a few rows.
  rgb = shade * (tint * jnp.array([0.80, 0.88, 0.95])
                 + (1 - tint) * jnp.array([0.94, 0.94, 0.94]))
  depth = jnp.clip((y - top) / jnp.maximum(bottom - top, 1.0), 0.0, 1.0)
  pleats = 1.0 - 0.06 * (0.5 + 0.5 * jnp.cos(2 * jnp.pi * g.mask_pleats * depth))
  paint = _colour(rgb * pleats[..., None], channels)
  return _inside(distance), jnp.broadcast_to(paint, (side, side, channels))


def _paint_blocks(key, side, channels, g: Geometry):
  n = g.num_blocks
  k_shape, k_noise = jax.random.split(key)
  log_aspect = (math.log(g.block_aspect[0]), math.log(g.block_aspect[1]))
  u = draw_uniform(k_shape, [(0.0, 1.0)] * (1 + 2 * n) + [log_aspect] * n)
  transpose = u[0] < 0.5
  u_along, u_across, aspect = u[1:1 + n], u[1 + n:1 + 2 * n], jnp.exp(u[1 + 2 * n:])
  strip = side // n
  block_pixels = g.block_area * side * side / n
  # aspect = extent along the strip axis / extent across it; clamping one extent
  # to its strip and recomputing the other keeps the area.
  along = jnp.minimum(jnp.sqrt(block_pixels * aspect), strip)
  across = jnp.minimum(block_pixels / along, side)
  along = jnp.minimum(block_pixels / across, strip)
  along = jnp.clip(jnp.round(along), 1, strip)
  across = jnp.clip(jnp.round(across), 1, side)
  start_along = jnp.arange(n) * strip + jnp.floor(u_along * (strip - along + 1))
  start_across = jnp.floor(u_across * (side - across + 1))
  index = jnp.arange(side, dtype=jnp.float32)
  in_along = (index >= start_along[:, None]) & (index < (start_along + along)[:, None])
  in_across = (index >= start_across[:, None]) & (index < (start_across + across)[:, None])
  # [n, side] x [n, side] -> [side(across = rows), side(along = cols)]
  coverage = jnp.any(in_across[:, :, None] & in_along[:, None, :], axis=0)
  coverage = jnp.where(transpose, coverage.T, coverage)
  if g.block_fill == "noise":
    paint = jax.random.uniform(k_noise, (side, side, channels))
  else:
    paint = jnp.zeros((side, side, channels))
  return coverage.astype(jnp.float32), paint


# The default hand in its own frame (unit = crop side; +along = finger
# direction, +across = thumb side): (along, across, half-length, half-width,
# angle in degrees) per ellipse. Palm first, then four fingers, then the thumb.
_HAND_ELLIPSES = (
    (0.00, 0.00, 0.19, 0.17, 0.0),
    (0.28, -0.120, 0.125, 0.042, -8.0),
    (0.32, -0.042, 0.150, 0.043, -3.0),
    (0.32, 0.040, 0.145, 0.043, 2.0),
    (0.28, 0.118, 0.130, 0.040, 7.0),
    (0.03, 0.20, 0.125, 0.048, 55.0),
)


def _paint_hand(key, side, channels, g: Geometry):
  k_shape, k_noise = jax.random.split(key)
  (u_side, u_left, lower_y, lower_x, side_y, turn, scale, u_flip,
   tone) = draw_uniform(k_shape, [
       (0.0, 1.0), (0.0, 1.0), g.hand_lower_y, g.hand_lower_x, g.hand_side_y,
       (-g.hand_turn_deg, g.hand_turn_deg), g.hand_scale, (0.0, 1.0), (0.0, 1.0)])
  y, x = _pixel_grid(side)
  # Over the mouth: the palm sits on the lower face, fingers up. On a cheek:
  # the palm is at the image edge, fingers pointing in and slightly up.
  on_side, left = u_side < g.hand_side_prob, u_left < 0.5
  side_x = jnp.where(left, g.hand_side_x, 1 - g.hand_side_x)
  side_angle = jnp.where(left, -20.0, -160.0) + turn
  centre_y = side * jnp.where(on_side, side_y, lower_y)
  centre_x = side * jnp.where(on_side, side_x, lower_x)
  angle = jnp.deg2rad(jnp.where(on_side, side_angle, -90.0 + turn))
  scale = side * scale
  # Left or right hand: mirror the thumb side.
  handedness = jnp.where(u_flip < 0.5, 1.0, -1.0)

  along, across = _rotate(y, x, centre_y, centre_x, angle)
  across = across * handedness
  e = jnp.asarray(_HAND_ELLIPSES, dtype=jnp.float32)[:, :, None, None]
  e_along, e_across, e_len, e_wid, e_angle = (e[:, i] for i in range(5))
  # Each ellipse's own frame; the hand frame is (along, across) = (x, y) here.
  ellipse_along, ellipse_across = _rotate(across[None], along[None], scale * e_across,
                                          scale * e_along, jnp.deg2rad(e_angle))
  radius = jnp.hypot(ellipse_along / (scale * e_len), ellipse_across / (scale * e_wid))
  distance = (radius - 1.0) * scale * jnp.minimum(e_len, e_wid)
  coverage = jnp.max(_inside(distance), axis=0)

  # Skin tones from light to dark, shaded towards each ellipse's rim.
  rgb = (1 - tone) * jnp.array([0.93, 0.78, 0.67]) + tone * jnp.array([0.45, 0.30, 0.22])
  shading = 1.0 - 0.18 * jnp.clip(jnp.min(radius, axis=0), 0.0, 1.0)**2
  # Noise drawn on a coarse grid and upsampled reads as skin texture; per-pixel
  # noise reads as sand.
  coarse = jax.random.normal(k_noise, (side // 4 + 1, side // 4 + 1))
  noise = g.hand_noise * jax.image.resize(coarse, (side, side), "linear")
  paint = jnp.clip(_colour(rgb * (shading + noise)[..., None], channels), 0.0, 1.0)
  return coverage, paint


_PAINTERS: dict[str, Painter] = {
    "eyes": _paint_eyes, "mouth": _paint_mouth, "blocks": _paint_blocks,
    "hand": _paint_hand,
}


def _paint_random(key, side, channels, g: Geometry):
  k_kind, k_shape = jax.random.split(key)
  choice = jax.random.randint(k_kind, (), 0, len(KINDS))
  # Under vmap lax.switch would evaluate every branch anyway, and a batched
  # switch fails under Explicit mesh axes (jax 0.10); selecting does neither.
  coverage, paint = 0.0, 0.0
  for i, name in enumerate(KINDS):
    kind_coverage, kind_paint = _PAINTERS[name](k_shape, side, channels, g)
    coverage = jnp.where(choice == i, kind_coverage, coverage)
    paint = jnp.where(choice == i, kind_paint, paint)
  return coverage, paint


def like_batch(values: jax.Array, images: jax.Array) -> jax.Array:
  """Per-image ``values`` ``[B, ...]`` resharded like the batch axis of ``images``.

  Under a mesh with Explicit axes, vmap and elementwise ops need per-image keys
  and flags sharded exactly like the images they pair with; with Auto axes or
  no mesh the compiler propagates shardings and this is the identity.
  """
  sharding = jax.typeof(images).sharding
  batch_axes = sharding.spec[0] if sharding.spec else None
  if batch_axes is None:
    return values
  batch_axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
  axis_types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types))
  if not any(axis_types[a] == jax.sharding.AxisType.Explicit for a in batch_axes):
    return values
  return jax.sharding.reshard(values, jax.sharding.NamedSharding(sharding.mesh,
                                                                P(sharding.spec[0])))


def _check_images(images, where: str) -> tuple[int, int]:
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{where}: images must be NHWC with 1 or 3 channels, "
                     f"got shape {tuple(images.shape)}")
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"{where}: occluder geometry is defined for square face "
                     f"crops, got {images.shape[1]}x{images.shape[2]}")
  return images.shape[1], images.shape[3]


def _painter(kind: str, where: str) -> Painter:
  if kind == "random":
    return _paint_random
  if kind not in _PAINTERS:
    raise ValueError(f"{where}: kind must be one of {KINDS + ('random',)}, got {kind!r}")
  return _PAINTERS[kind]


@functools.partial(jax.jit, static_argnames=("kind", "value_scale", "geometry", "where"))
def _occlude_with_keys(keys, images, kind, value_scale, geometry, where):
  side, channels = _check_images(images, where)
  painter = _painter(kind, where)
  if value_scale is None:
    value_scale = 255.0 if jnp.issubdtype(images.dtype, jnp.integer) else 1.0
  keys = like_batch(keys, images)
  coverage, paint = jax.vmap(lambda k: painter(k, side, channels, geometry))(keys)
  coverage = coverage[..., None]
  blended = images.astype(jnp.float32) * (1 - coverage) + value_scale * paint * coverage
  if jnp.issubdtype(images.dtype, jnp.integer):
    info = jnp.iinfo(images.dtype)
    blended = jnp.clip(jnp.round(blended), info.min, info.max)
  return blended.astype(images.dtype)


def occlude(key: jax.Array, images: jax.Array, kind: str, *,
            value_scale: float | None = None, **geometry) -> jax.Array:
  """Pastes a freshly drawn occluder of ``kind`` on each image.

  Args:
    key: PRNG key; each image gets its own split.
    images: ``[B, S, S, C]`` uint8 or float, C in {1, 3}.
    kind: one of ``KINDS`` or ``'random'`` (a kind drawn per image).
    value_scale: the pixel value of white; defaults to 255 for integer dtypes
      and 1.0 for floats (pass 255.0 for float images in [0, 255]).
    **geometry: overrides of ``Geometry`` fields (e.g. ``block_area=0.4``).

  Returns:
    The occluded images, same shape and dtype.
  """
  keys = jax.random.split(key, images.shape[0])
  return _occlude_with_keys(keys, images, kind, value_scale, Geometry(**geometry),
                            "occlude")


def fixed_keys(indices: jax.Array, kind: str, seed: int = 0) -> jax.Array:
  """The protocol's per-image keys: fold_in(fold_in(key(seed), kind code), index)."""
  if kind not in _KIND_CODES:
    raise ValueError(f"fixed_keys: kind must be one of {tuple(_KIND_CODES)}, got {kind!r}")
  base = jax.random.fold_in(jax.random.key(seed), _KIND_CODES[kind])
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.asarray(indices).astype(jnp.uint32))


def occlude_fixed(images: jax.Array, indices: jax.Array, kind: str, seed: int = 0, *,
                  value_scale: float | None = None, **geometry) -> jax.Array:
  """The deterministic test protocol (docs/occlusion_protocol.md).

  Each image's occluder depends only on ``(seed, kind, indices[b])``, so a test
  split occluded in any batch order, batch size or sharding gives identical
  pixels. Published numbers use ``seed=0`` and the default ``Geometry``.

  Args:
    images: ``[B, S, S, C]`` uint8 or float, C in {1, 3}.
    indices: ``[B]`` non-negative dataset indices of the images (< 2**31).
    kind: one of ``KINDS`` or ``'random'``.
    seed: protocol seed.
    value_scale: as in ``occlude``.
    **geometry: overrides of ``Geometry`` fields (not the published protocol).
  """
  if jnp.shape(indices) != images.shape[:1]:
    raise ValueError(f"occlude_fixed: indices must have shape {images.shape[:1]} "
                     f"(one per image), got {jnp.shape(indices)}")
  return _occlude_with_keys(fixed_keys(indices, kind, seed), images, kind, value_scale,
                            Geometry(**geometry), "occlude_fixed")
