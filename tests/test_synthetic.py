"""The embedded dataset: deterministic, balanced, with V/A, and not a trivial task."""
import numpy as np

from fer_jax.data import synthetic


def test_deterministic_balanced_and_labelled():
  a = synthetic.generate("validation", 140, seed=3).arrays
  b = synthetic.generate("validation", 140, seed=3).arrays
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert a["image"].shape == (140, 48, 48, 1) and a["image"].dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(a["label"]), np.full(7, 20))
  assert np.all(np.abs(a["valence"]) <= 1) and np.all(np.abs(a["arousal"]) <= 1)
  for other in (synthetic.generate("test", 140, seed=3), synthetic.generate("validation", 140,
                                                                           seed=4)):
    assert not np.array_equal(a["image"], other.arrays["image"])


def test_pixels_alone_do_not_solve_the_task():
  """A ridge-regression linear classifier on raw pixels stays far below the CNNs.

  configs/mkd.py's models reach 96.9 % (teacher) and 91.1 % (student) on the test
  split; the linear probe measured 60 % on these sizes, nearest class mean 29 %.
  """
  train = synthetic.generate("train", 3000).arrays
  test = synthetic.generate("test", 700).arrays
  flat = lambda split: split["image"].reshape(len(split["label"]), -1) / 255.0
  x, x_test = flat(train), flat(test)
  mean = x.mean(0)
  design = np.c_[x - mean, np.ones(len(x))]
  weights = np.linalg.solve(design.T @ design + 10.0 * np.eye(design.shape[1]),
                            design.T @ np.eye(7)[train["label"]])
  predicted = np.argmax(np.c_[x_test - mean, np.ones(len(x_test))] @ weights, axis=1)
  accuracy = np.mean(predicted == test["label"])
  assert 1 / 7 + 0.1 < accuracy < 0.7, accuracy
