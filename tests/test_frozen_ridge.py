"""experiments/frozen_ridge.py: the closed-form ridge against least squares on augmented rows,
and the standardisation as an invariance."""
import numpy as np

from experiments import frozen_ridge


def test_ridge_accuracies_match_least_squares_on_augmented_rows():
  """Ridge regression is least squares with sqrt(weight) * I appended to the design."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 5)) * 2
  labels = rng.integers(0, 3, 120)
  features = centres[labels] + rng.normal(size=(120, 5)) * 3 + 10
  held_out = rng.integers(0, 3, 60)
  held_out_features = centres[held_out] + rng.normal(size=(60, 5)) * 3 + 10
  results = frozen_ridge.ridge_accuracies(features, labels, {"eval": (held_out_features,
                                                                      held_out)}, 3)
  mean, std = features.mean(0), features.std(0) + 1e-6
  design = lambda x: np.c_[(x - mean) / std, np.ones(len(x))]
  for weight, accuracy in results.items():
    augmented = np.r_[design(features), np.sqrt(weight) * np.eye(6)]
    targets = np.r_[np.eye(3)[labels], np.zeros((6, 3))]
    coefficients = np.linalg.lstsq(augmented, targets, rcond=None)[0]
    expected = np.mean((design(held_out_features) @ coefficients).argmax(-1) == held_out)
    assert accuracy["eval"] == expected
  assert results[0.01]["eval"] > 0.6  # well above chance (1/3) on these separated classes


def test_ridge_accuracies_do_not_depend_on_each_features_scale_or_offset():
  """The embedding is standardised on the training split, so the ridge penalty treats
  every feature alike whatever its units; without that, large weights would shrink the
  small-scale features first and change the accuracies."""
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(4, 6)) * 2
  labels, held_out = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
  features = centres[labels] + rng.normal(size=(200, 6)) * 3
  held_out_features = centres[held_out] + rng.normal(size=(80, 6)) * 3
  scale, offset = 10.0 ** rng.uniform(-3, 3, 6), rng.normal(size=6) * 100
  original, rescaled = (
      frozen_ridge.ridge_accuracies(f, labels, {"eval": (h, held_out)}, 4)
      for f, h in ((features, held_out_features),
                   (features * scale + offset, held_out_features * scale + offset)))
  for weight in original:
    assert abs(original[weight]["eval"] - rescaled[weight]["eval"]) <= 1 / 80, weight
  # Large weights do select: the accuracy changes along the grid.
  assert len({round(r["eval"], 4) for r in original.values()}) > 1
