"""Jitted training augmentation and evaluation preprocessing for face crops.

Training (``augment``), per image, each draw from its own key:
  1. synthetic occlusion with probability ``occlusion_prob`` (an occluder of
     ``occlusion_kind``, by default 'random': a kind drawn per image), applied
     first because the occluder geometry assumes an aligned crop;
  2. one affine resampling (bilinear) that combines a random resized crop
     (area fraction ``crop_scale``, width/height ratio ``crop_ratio``, as
     torchvision's RandomResizedCrop but resized back to the input size; a
     side longer than the image is clamped to it, so the 0.8-1.2 FER2013
     recipe works), a horizontal flip with probability 1/2 when ``flip`` and a
     rotation by U(-``rotation_deg``, ``rotation_deg``) about the crop centre;
  3. random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI
     2020): with probability ``erase_prob`` a rectangle of area fraction
     U(``erase_area``) and aspect ratio log-U(``erase_ratio``) is filled with
     uniform random values;
  4. normalisation ``(x / 255 - mean) / std`` with per-channel ``mean``/``std``.

The defaults follow the FER2013 recipes of docs/methods.md §3 (flip, +-10
degrees, random erasing) with a crop area of 0.8-1.0; the recipes' 0.8-1.2 is
``crop_scale=(0.8, 1.2)``. Choices the papers leave open are fields:
``pad_mode`` ('edge' replicates border pixels where rotation or a crop leaves
the image, so the empty corners do not look like occluders; 'zeros' is
torchvision's fill) and ``erase_ratio`` (Zhong et al.'s r1 = 0.3).

Everything is pure JAX and vmapped over per-image keys, so it jits once per
input shape and runs on a batch sharded over devices. Read the config outside
the trace: ``jax.jit(functools.partial(augment, cfg=cfg))``.
"""
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from fer_jax.data import occlusion


def default_augment_config() -> ml_collections.ConfigDict:
  """The augmentation fields and their defaults."""
  return ml_collections.ConfigDict(dict(
      crop_scale=(0.8, 1.0),
      crop_ratio=(0.9, 1.1),
      flip=True,
      rotation_deg=10.0,
      erase_prob=0.25,
      erase_area=(0.02, 0.2),
      erase_ratio=(0.3, 3.3),
      occlusion_prob=0.0,
      occlusion_kind="random",
      pad_mode="edge",
      mean=(0.5,),
      std=(0.5,),
  ))


def _resolve(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None
             ) -> ml_collections.ConfigDict:
  """The defaults overridden by ``cfg``; unknown or malformed fields raise."""
  resolved = default_augment_config()
  given = dict(cfg.items()) if cfg is not None else {}
  # ConfigDict fields keep their type; ranges typed on the command line or in a
  # dict may arrive as lists.
  given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
  unknown = sorted(set(given) - set(resolved))
  if unknown:
    raise KeyError(f"augment config: unknown field(s) {unknown}; "
                   f"known: {sorted(resolved)}")
  resolved.update(given)
  for name in ("crop_scale", "crop_ratio", "erase_area", "erase_ratio"):
    lo, hi = resolved[name]
    if not 0 < lo <= hi:
      raise ValueError(f"augment config: {name} must be a range 0 < lo <= hi, "
                       f"got {(lo, hi)}")
  if resolved.erase_area[1] > 1:
    raise ValueError("augment config: erase_area is a fraction of the image (<= 1), "
                     f"got {resolved.erase_area}")
  if min(resolved.std) <= 0:
    raise ValueError(f"augment config: std must be positive, got {resolved.std}")
  for name in ("erase_prob", "occlusion_prob"):
    if not 0 <= resolved[name] <= 1:
      raise ValueError(f"augment config: {name} must be in [0, 1], got {resolved[name]}")
  if resolved.occlusion_kind not in occlusion.KINDS + ("random",):
    raise ValueError(f"augment config: occlusion_kind must be one of "
                     f"{occlusion.KINDS + ('random',)}, got {resolved.occlusion_kind!r}")
  if resolved.pad_mode not in ("edge", "zeros"):
    raise ValueError(f"augment config: pad_mode must be 'edge' or 'zeros', "
                     f"got {resolved.pad_mode!r}")
  return resolved


def _check_uint8(images: jax.Array, where: str) -> None:
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{where}: images must be uint8 NHWC with 1 or 3 channels, "
                     f"got {images.dtype} {tuple(images.shape)}")


def _normalise(images: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """``(x / 255 - mean) / std`` on float32 pixels in [0, 255]."""
  channels = images.shape[-1]
  for name in ("mean", "std"):
    if len(cfg[name]) not in (1, channels):
      raise ValueError(f"augment config: {name} needs 1 or {channels} values for "
                       f"{channels}-channel images, got {tuple(cfg[name])}")
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  return (images / 255.0 - mean) / std


def preprocess_eval(images: jax.Array, cfg=None) -> jax.Array:
  """Evaluation preprocessing: uint8 ``[B, H, W, C]`` -> normalised float32."""
  _check_uint8(images, "preprocess_eval")
  return _normalise(images.astype(jnp.float32), _resolve(cfg))


def _bilinear(image: jax.Array, src_y: jax.Array, src_x: jax.Array,
              pad_mode: str) -> jax.Array:
  """Samples ``image`` [H, W, C] at fractional pixel indices [H', W']."""
  height, width = image.shape[:2]
  if pad_mode == "edge":
    src_y = jnp.clip(src_y, 0, height - 1)
    src_x = jnp.clip(src_x, 0, width - 1)
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]

  def tap(y, x):
    valid = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
    value = image[jnp.clip(y, 0, height - 1).astype(jnp.int32),
                  jnp.clip(x, 0, width - 1).astype(jnp.int32)]
    return jnp.where(valid[..., None], value, 0.0)

  return ((1 - wy) * ((1 - wx) * tap(y0, x0) + wx * tap(y0, x0 + 1))
          + wy * ((1 - wx) * tap(y0 + 1, x0) + wx * tap(y0 + 1, x0 + 1)))


def _random_affine(key, image, cfg):
  """Random resized crop + flip + rotation as one bilinear resampling."""
  height, width = image.shape[:2]
  area, log_ratio, u_y, u_x, u_flip, angle = occlusion.draw_uniform(key, [
      cfg.crop_scale, (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])),
      (0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (-cfg.rotation_deg, cfg.rotation_deg)])
  crop_w = jnp.minimum(jnp.sqrt(area * jnp.exp(log_ratio)), 1.0)
  crop_h = jnp.minimum(jnp.sqrt(area / jnp.exp(log_ratio)), 1.0)
  centre_y = height * (0.5 * crop_h + u_y * (1 - crop_h))
  centre_x = width * (0.5 * crop_w + u_x * (1 - crop_w))
  mirror = jnp.where(u_flip < 0.5, -1.0, 1.0) if cfg.flip else 1.0
  cos, sin = jnp.cos(jnp.deg2rad(angle)), jnp.sin(jnp.deg2rad(angle))
  # Output pixel centres relative to the output centre, scaled into the crop.
  out_y = (jnp.arange(height, dtype=jnp.float32) + 0.5 - 0.5 * height)[:, None]
  out_x = (jnp.arange(width, dtype=jnp.float32) + 0.5 - 0.5 * width)[None, :]
  out_y, out_x = out_y * crop_h, out_x * crop_w * mirror
  src_y = centre_y + sin * out_x + cos * out_y - 0.5
  src_x = centre_x + cos * out_x - sin * out_y - 0.5
  return _bilinear(image, src_y, src_x, cfg.pad_mode)


def _random_erase(key, image, cfg):
  """Zhong et al.'s random erasing on one float image in [0, 255]."""
  k_shape, k_fill = jax.random.split(key)
  height, width = image.shape[:2]
  u_apply, area, log_ratio, u_y, u_x = occlusion.draw_uniform(k_shape, [
      (0.0, 1.0), cfg.erase_area,
      (math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])), (0.0, 1.0), (0.0, 1.0)])
  # Zhong et al. redraw boxes that do not fit; clamping to the image is the
  # loop-free equivalent that keeps the box inside.
  box_h = jnp.clip(jnp.round(height * jnp.sqrt(area * jnp.exp(log_ratio))), 1, height)
  box_w = jnp.clip(jnp.round(width * jnp.sqrt(area / jnp.exp(log_ratio))), 1, width)
  top = jnp.floor(u_y * (height - box_h + 1))
  left = jnp.floor(u_x * (width - box_w + 1))
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  inside &= u_apply < cfg.erase_prob
  fill = jax.random.uniform(k_fill, image.shape, maxval=255.0)
  return jnp.where(inside[..., None], fill, image)


def augment(key: jax.Array, images: jax.Array, cfg=None) -> jax.Array:
  """Training augmentation: uint8 ``[B, H, W, C]`` -> normalised float32, same size.

  Args:
    key: PRNG key for the batch, split per image inside.
    images: uint8 NHWC, C in {1, 3}.
    cfg: ConfigDict or dict overriding ``default_augment_config()`` fields.
  """
  _check_uint8(images, "augment")
  cfg = _resolve(cfg)
  k_occlude, k_apply, k_images = jax.random.split(key, 3)
  if cfg.occlusion_prob > 0:
    occluded = occlusion.occlude(k_occlude, images, cfg.occlusion_kind)
    chosen = occlusion.like_batch(
        jax.random.bernoulli(k_apply, cfg.occlusion_prob, images.shape[:1]), images)
    images = jnp.where(chosen[:, None, None, None], occluded, images)

  def one_image(k, image):
    k_affine, k_erase = jax.random.split(k)
    image = _random_affine(k_affine, image.astype(jnp.float32), cfg)
    return _random_erase(k_erase, image, cfg) if cfg.erase_prob > 0 else image

  keys = occlusion.like_batch(jax.random.split(k_images, images.shape[0]), images)
  images = jax.vmap(one_image)(keys, images)
  return _normalise(images, cfg)
