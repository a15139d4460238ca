"""Tests for fer_jax.data.augment against numpy references of each transform."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fer_jax.data import augment as aug

SIDE = 16
# Every geometric and erasing draw switched off.
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                rotation_deg=0.0, erase_prob=0.0)


def _images(n=2, side=SIDE, channels=1, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(
      0, 256, (n, side, side, channels), dtype=np.uint8))


def _normalised(images, mean, std):
  """numpy reference of the normalisation."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (np.asarray(images, np.float32) / 255.0 - mean) / std


def _pixels(out, mean=0.5, std=0.5):
  """Undoes the normalisation: float pixels in [0, 255]."""
  return (np.asarray(out, np.float64) * std + mean) * 255.0


# The fields the module docstring of fer_jax/data/augment.py documents, read
# off its text (steps 1-4 and the paragraph on open choices).
DOCUMENTED_FIELDS = {
    "occlusion_prob", "occlusion_kind",                     # step 1
    "crop_scale", "crop_ratio", "flip", "rotation_deg",     # step 2
    "erase_prob", "erase_area", "erase_ratio",              # step 3
    "mean", "std",                                          # step 4
    "pad_mode",                                             # open choices
}


def test_default_config_has_the_documented_fields():
  cfg = aug.default_augment_config()
  assert set(cfg.keys()) == DOCUMENTED_FIELDS
  # Every ``name`` in the docstring that is not the function itself is a
  # field: a field added or renamed without documenting it fails here.
  quoted = set(re.findall(r"``([a-z_]+)``", aug.__doc__))
  assert quoted - {"augment"} == DOCUMENTED_FIELDS
  # The FER2013-recipe defaults the docstring states.
  assert cfg.crop_scale == (0.8, 1.0) and cfg.flip is True
  assert cfg.rotation_deg == 10.0 and cfg.erase_ratio == (0.3, 3.3)
  assert cfg.pad_mode == "edge" and cfg.occlusion_kind == "random"
  assert aug._resolve(None).to_dict() == cfg.to_dict()  # pylint: disable=protected-access


def test_unknown_field_raises():
  with pytest.raises(KeyError, match=r"unknown field\(s\) \['rotation'\]"):
    aug._resolve(dict(rotation=5.0))  # pylint: disable=protected-access
  with pytest.raises(KeyError, match="crop_scales"):
    aug.augment(jax.random.key(0), _images(), dict(crop_scales=(0.5, 1.0)))


@pytest.mark.parametrize("field, value, message", [
    # Ranges must satisfy 0 < lo <= hi.
    ("crop_scale", (0.9, 0.5), "crop_scale must be a range"),
    ("crop_scale", (0.0, 1.0), "crop_scale must be a range"),
    ("crop_ratio", (1.2, 0.8), "crop_ratio must be a range"),
    ("crop_ratio", (-1.0, 1.0), "crop_ratio must be a range"),
    ("erase_area", (0.3, 0.1), "erase_area must be a range"),
    ("erase_area", (0.0, 0.1), "erase_area must be a range"),
    ("erase_ratio", (3.3, 0.3), "erase_ratio must be a range"),
    ("erase_ratio", (0.0, 3.3), "erase_ratio must be a range"),
    # An erased area is a fraction of the image.
    ("erase_area", (0.5, 1.5), "erase_area is a fraction"),
    ("std", (0.5, 0.0, 0.5), "std must be positive"),
    ("std", (-1.0,), "std must be positive"),
    # Probabilities lie in [0, 1].
    ("erase_prob", -0.1, "erase_prob must be in"),
    ("erase_prob", 1.5, "erase_prob must be in"),
    ("occlusion_prob", -0.5, "occlusion_prob must be in"),
    ("occlusion_prob", 1.01, "occlusion_prob must be in"),
    ("occlusion_kind", "scarf", "occlusion_kind must be one of"),
    ("pad_mode", "reflect", "pad_mode must be"),
])
def test_each_range_check_raises(field, value, message):
  with pytest.raises(ValueError, match=message):
    aug._resolve({field: value})  # pylint: disable=protected-access


@pytest.mark.parametrize("field, value", [
    ("crop_scale", (1.0, 1.0)), ("erase_area", (0.5, 1.0)),
    ("erase_prob", 0.0), ("erase_prob", 1.0), ("occlusion_prob", 1.0),
    ("pad_mode", "zeros"), ("occlusion_kind", "hand"),
])
def test_boundary_values_are_accepted(field, value):
  assert aug._resolve({field: value})[field] == value  # pylint: disable=protected-access


def test_default_augment_shape_dtype_range():
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  images = _images(channels=3)
  cfg = aug.default_augment_config()
  cfg.mean, cfg.std = mean, std
  out = np.asarray(aug.augment(jax.random.key(0), images, cfg))
  assert out.shape == images.shape and out.dtype == np.float32
  lo, hi = _normalised(np.array([[0], [255]]), mean, std)  # per channel
  assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)
  assert np.abs(out - _normalised(images, mean, std)).mean() > 0.1


def test_identity_settings_reproduce_the_normalised_input():
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  images = _images(channels=3)
  out = aug.augment(jax.random.key(1), images, dict(IDENTITY, mean=mean, std=std))
  np.testing.assert_allclose(out, _normalised(images, mean, std), rtol=0, atol=1e-6)
  np.testing.assert_allclose(out, aug.preprocess_eval(images, dict(mean=mean, std=std)),
                             rtol=0, atol=1e-6)


def test_flip_gives_the_input_or_its_mirror():
  images = _images(n=8)
  out = np.asarray(aug.augment(jax.random.key(2), images, dict(IDENTITY, flip=True)))
  reference = _normalised(images, 0.5, 0.5)
  flipped = [np.allclose(o, r[:, ::-1], rtol=0, atol=1e-6) for o, r in zip(out, reference)]
  kept = [np.allclose(o, r, rtol=0, atol=1e-6) for o, r in zip(out, reference)]
  assert all(f != k for f, k in zip(flipped, kept))
  # This key draws both outcomes, so both code paths are exercised.
  assert any(flipped) and any(kept)


def test_crop_zooms_about_the_crop():
  # A horizontal ramp of slope 8 per pixel, cropped to a quarter of the area
  # (half the side) and resized back, has slope 4 and is constant down columns.
  ramp = jnp.broadcast_to((8 * jnp.arange(32)).astype(jnp.uint8)[None, None, :, None],
                          (2, 32, 32, 1))
  cfg = dict(IDENTITY, crop_scale=(0.25, 0.25))
  pixels = _pixels(aug.augment(jax.random.key(3), ramp, cfg))
  # Border columns may sample past the edge (clamped), as in torchvision.
  np.testing.assert_allclose(np.diff(pixels, axis=2)[:, :, 1:-1], 4.0, atol=1e-3)
  np.testing.assert_allclose(np.diff(pixels, axis=1), 0.0, atol=1e-3)


def test_rotation_turns_about_the_centre():
  cfg = dict(IDENTITY, rotation_deg=30.0, pad_mode="zeros")
  # A radially symmetric image is unchanged by any rotation about its centre.
  coords = np.arange(SIDE) + 0.5 - SIDE / 2
  radius = np.hypot(coords[:, None], coords[None, :])
  disk = np.broadcast_to((255 * np.exp(-(radius / 5) ** 2)).round().astype(np.uint8)
                         [None, :, :, None], (4, SIDE, SIDE, 1))
  rotated = _pixels(aug.augment(jax.random.key(4), jnp.asarray(disk), cfg))
  # Inside the inscribed circle nothing samples past the border; the tolerance
  # is the bilinear error on the disk's slope.
  inscribed = radius < SIDE / 2 - 1
  np.testing.assert_allclose(rotated[:, inscribed], disk[:, inscribed], atol=6.0)
  # A ramp of slope 12 keeps its slope and turns its gradient by the angle.
  ramp = np.broadcast_to(np.arange(0, 12 * SIDE, 12, dtype=np.uint8)[None, None, :, None],
                         disk.shape)
  turned = _pixels(aug.augment(jax.random.key(4), jnp.asarray(ramp), cfg))[..., 0]
  centre = slice(4, -4)
  grad_x = np.diff(turned, axis=2)[:, centre, centre].mean(axis=(1, 2))
  grad_y = np.diff(turned, axis=1)[:, centre, centre].mean(axis=(1, 2))
  np.testing.assert_allclose(np.hypot(grad_x, grad_y), 12.0, rtol=1e-3)
  angles = np.degrees(np.arctan2(grad_y, grad_x))
  assert np.all(np.abs(angles) <= 30.0) and np.abs(angles).max() > 5.0, angles


def test_random_erasing_covers_the_requested_area():
  black = jnp.zeros((4, 32, 32, 1), jnp.uint8)
  cfg = dict(IDENTITY, erase_prob=1.0, erase_area=(0.1, 0.1), erase_ratio=(1.0, 1.0))
  erased = _pixels(aug.augment(jax.random.key(5), black, cfg)) > 1e-3
  # A 0.1-area square is round(32 * sqrt(0.1)) = 10 px on a side; a handful of
  # uniform fill values may land on 0.
  np.testing.assert_allclose(erased.mean(axis=(1, 2, 3)), 100 / 1024, atol=3 / 1024)


def _changed_images(field, prob, key):
  """Which of 256 grey images the augmentation with ``field=prob`` alone changed."""
  grey = jnp.full((256, 32, 32, 1), 128, jnp.uint8)
  out = _pixels(aug.augment(jax.random.key(key), grey, dict(IDENTITY, **{field: prob})))
  changed = np.abs(out - 128) > 0.5
  # An occluder covers at least 10% of the crop (docs/occlusion_protocol.md), an erased
  # patch 2%; the margins allow for fill values that match the grey in places.
  least = {"occlusion_prob": 0.05, "erase_prob": 0.01}[field]
  hit = changed.mean(axis=(1, 2, 3))
  assert np.all((hit == 0) | (hit > least)), "an image was changed in only a few pixels"
  return hit > 0


@pytest.mark.parametrize("field", ["occlusion_prob", "erase_prob"])
def test_the_probability_switches_each_image_on_or_off(field):
  assert not _changed_images(field, 0.0, key=6).any()
  assert _changed_images(field, 1.0, key=6).all()
  # 256 fair coins: 5 standard deviations (0.156) either side of a half.
  assert 0.34 < _changed_images(field, 0.5, key=6).mean() < 0.66


def test_jits_once_per_shape():
  cfg = aug.default_augment_config()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(key, images):
    return aug.augment(key, images, cfg)

  first = fn(jax.random.key(0), _images(seed=0))
  second = fn(jax.random.key(1), _images(seed=1))
  assert not np.array_equal(first, second)


def _sharded_matches_unsharded(axis_type, cfg):
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  fn = jax.jit(functools.partial(aug.augment, cfg=cfg))
  images = _images(n=8)
  expected = fn(jax.random.key(7), images)
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  out = fn(jax.random.key(7), sharded)
  assert out.sharding.spec[0] == "data"
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_batch_matches_unsharded(axis_type):
  # Blocks compile fastest; the per-image occlusion switch is still exercised.
  _sharded_matches_unsharded(
      axis_type, dict(occlusion_prob=0.5, occlusion_kind="blocks", erase_prob=0.5))


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_batch_matches_unsharded_with_every_occluder(axis_type):
  _sharded_matches_unsharded(axis_type, dict(occlusion_prob=0.5, erase_prob=0.5))


def test_bad_config_and_input_are_named():
  with pytest.raises(KeyError, match="crop_scales"):
    aug.preprocess_eval(_images(), dict(crop_scales=(0.5, 1.0)))
  with pytest.raises(ValueError, match="mean needs 1 or 1 values"):
    aug.preprocess_eval(_images(), dict(mean=(0.5, 0.5, 0.5), std=(0.5,)))
  with pytest.raises(ValueError, match="crop_scale"):
    aug.augment(jax.random.key(0), _images(), dict(crop_scale=(0.9, 0.5)))
  with pytest.raises(ValueError, match="std must be positive"):
    aug.preprocess_eval(_images(), dict(std=(0.0,)))
  with pytest.raises(ValueError, match="uint8"):
    aug.augment(jax.random.key(0), _images().astype(jnp.float32), None)
