"""experiments/logit_adjustment.py: the shifted logits' metrics against a hand count."""
import numpy as np

from experiments import logit_adjustment


def test_adjustment_moves_near_ties_to_the_rare_class():
  # Two classes, priors 0.9 / 0.1: tau shifts class 1's logit up by tau * log(9)
  # (2.20 at tau = 1, 0.88 at tau = 0.4). Image 0 (class 1) leans to class 0 by 1.0,
  # image 1 (class 0) by 3.0, image 2 (class 0) by 0.1.
  logits = np.array([[1.0, 0.0], [3.0, 0.0], [0.1, 0.0]])
  labels = np.array([1, 0, 0])
  log_prior = np.log([0.9, 0.1])
  expected = {  # tau: (predictions, recall per class)
      0.0: ([0, 0, 0], [1.0, 0.0]),
      0.4: ([0, 0, 1], [0.5, 0.0]),
      1.0: ([1, 0, 1], [0.5, 1.0]),
  }
  for tau, (predictions, recall) in expected.items():
    values = logit_adjustment.adjusted_metrics(logits, labels, log_prior, tau)
    assert values["accuracy"] == np.mean(np.array(predictions) == labels)
    np.testing.assert_array_equal(values["recall"], recall)
    assert values["mean_class_accuracy"] == np.mean(recall)
