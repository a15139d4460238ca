"""Tests for fer_jax.metrics against independent numpy references.

The references below are written from the definitions (EmoNet's
emonet/metrics.py and emonet/evaluation.py for valence/arousal), not from
fer_jax.metrics, and the tiny cases carry their values worked out by hand.
"""
import math

import numpy as np
import pytest

from fer_jax import metrics

# --- independent references -------------------------------------------------


def _ref_confusion(labels, pred, num_classes):
  """confusion[i, j] = #samples with label i predicted as j, by a double loop."""
  out = np.zeros((num_classes, num_classes), np.int64)
  for i in range(num_classes):
    for j in range(num_classes):
      out[i, j] = sum(1 for y, p in zip(labels, pred) if y == i and p == j)
  return out


def _ref_mean_class_accuracy(labels, pred):
  """Mean over the classes present in ``labels`` of the recall of each class."""
  recalls = []
  for c in sorted(set(int(y) for y in labels)):
    members = [p for y, p in zip(labels, pred) if y == c]
    recalls.append(sum(1 for p in members if p == c) / len(members))
  return sum(recalls) / len(recalls)


def _ref_va(g, p):
  """EmoNet's RMSE, CCC (population statistics), PCC and SAGR, preds clipped."""
  g = np.asarray(g, np.float64)
  p = np.clip(np.asarray(p, np.float64), -1.0, 1.0)
  n = len(g)
  mean_p, mean_g = sum(p) / n, sum(g) / n
  cov = sum((a - mean_p) * (b - mean_g) for a, b in zip(p, g)) / n
  var_p = sum((a - mean_p) ** 2 for a in p) / n
  var_g = sum((b - mean_g) ** 2 for b in g) / n
  return {
      "rmse": math.sqrt(sum((a - b) ** 2 for a, b in zip(p, g)) / n),
      "ccc": 2 * cov / (var_p + var_g + (mean_p - mean_g) ** 2),
      "pcc": cov / math.sqrt(var_p * var_g),
      "sagr": sum(1 for a, b in zip(p, g) if np.sign(a) == np.sign(b)) / n,
  }


def _logits_for(pred, num_classes, seed=0):
  """Random logits whose argmax is ``pred`` (margin 1 over the others)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 1.0, (len(pred), num_classes)).astype(np.float32)
  logits[np.arange(len(pred)), pred] = logits.max(axis=1) + 1.0
  return logits


def _va_metrics(target, pred):
  """metrics.valence_arousal regrouped as {dimension: {metric: value}}."""
  out = metrics.valence_arousal(np.asarray(target, np.float32),
                                np.asarray(pred, np.float32))
  return {dim: {m: out[f"{dim}_{m}"] for m in ("rmse", "ccc", "pcc", "sagr")}
          for dim in ("valence", "arousal")}


# --- classification ---------------------------------------------------------


def test_classification_hand_computed():
  # 4 classes; class 3 is predicted once but never a label.
  #   label: 0 0 1 2 2 2
  #   pred:  0 3 1 2 0 2
  # accuracy 4/6; recalls: class 0 1/2, class 1 1/1, class 2 2/3 (class 3
  # absent, so left out): mean (1/2 + 1 + 2/3) / 3 = 13/18.
  labels = np.array([0, 0, 1, 2, 2, 2])
  pred = np.array([0, 3, 1, 2, 0, 2])
  out = metrics.classification(labels, _logits_for(pred, 4))
  assert out["accuracy"] == pytest.approx(4 / 6, abs=1e-12)
  assert out["mean_class_accuracy"] == pytest.approx(13 / 18, abs=1e-12)
  assert out["confusion"] == [[1, 0, 0, 1],
                              [0, 1, 0, 0],
                              [1, 0, 2, 0],
                              [0, 0, 0, 0]]


def test_classification_random_against_the_reference():
  rng = np.random.default_rng(1)
  num_classes = 7
  labels = rng.integers(0, num_classes - 1, 500)  # class 6 never a label
  # About half right, the rest uniform over all 7 classes (6 included).
  pred = np.where(rng.random(500) < 0.5, labels, rng.integers(0, num_classes, 500))
  out = metrics.classification(labels, _logits_for(pred, num_classes, seed=2))
  assert out["accuracy"] == pytest.approx(np.mean(labels == pred), abs=1e-12)
  assert out["mean_class_accuracy"] == pytest.approx(
      _ref_mean_class_accuracy(labels, pred), abs=1e-12)
  np.testing.assert_array_equal(np.array(out["confusion"]),
                                _ref_confusion(labels, pred, num_classes))
  assert np.array(out["confusion"])[6].sum() == 0  # the absent class's row
  assert np.array(out["confusion"])[:, 6].sum() > 0  # but it is predicted


def test_classification_perfect():
  labels = np.array([2, 0, 1, 1])
  out = metrics.classification(labels, _logits_for(labels, 3))
  assert out["accuracy"] == 1.0 and out["mean_class_accuracy"] == 1.0
  assert out["confusion"] == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


# --- valence / arousal ------------------------------------------------------


def test_va_hand_computed():
  # Valence: g = (-.5, -.5, .5, .5), p = (-.5, 0, 0, .5).
  #   means 0 and 0; var_g = .25, var_p = (.25 + .25) / 4 = .125,
  #   cov = (.25 + 0 + 0 + .25) / 4 = .125.
  #   RMSE = sqrt((0 + .25 + .25 + 0) / 4) = sqrt(1/8)
  #   CCC  = 2 * .125 / (.25 + .125 + 0) = 2/3
  #   PCC  = .125 / sqrt(.25 * .125) = 1/sqrt(2)
  #   SAGR: signs (-,-,+,+) vs (-,0,0,+) -> 2/4
  # Arousal: g = (-.5, -.5, .5, .5), p = (-3, -1, 1, 2), clipped to (-1,-1,1,1).
  #   means 0 and 0; var_p = 1, var_g = .25, cov = (.5 + .5 + .5 + .5) / 4 = .5
  #   RMSE = sqrt(4 * .25 / 4) = .5   (1.5 without the clipping)
  #   CCC  = 2 * .5 / (1 + .25) = 0.8
  #   PCC  = .5 / sqrt(1 * .25) = 1
  #   SAGR = 1
  target = np.array([[-.5, -.5], [-.5, -.5], [.5, .5], [.5, .5]])
  pred = np.array([[-.5, -3.], [0., -1.], [0., 1.], [.5, 2.]])
  got = _va_metrics(target, pred)
  want = {"valence": {"rmse": math.sqrt(1 / 8), "ccc": 2 / 3,
                      "pcc": 1 / math.sqrt(2), "sagr": 0.5},
          "arousal": {"rmse": 0.5, "ccc": 0.8, "pcc": 1.0, "sagr": 1.0}}
  for dim in want:
    for name, value in want[dim].items():
      assert got[dim][name] == pytest.approx(value, abs=1e-6), (dim, name)
  # The references agree with the hand values too.
  for i, dim in enumerate(("valence", "arousal")):
    ref = _ref_va(target[:, i], pred[:, i])
    for name, value in want[dim].items():
      assert ref[name] == pytest.approx(value, abs=1e-12), (dim, name)


def test_va_perfect_prediction():
  target = np.array([[-.8, .1], [-.2, .4], [.3, -.6], [.9, .2]])
  got = _va_metrics(target, target)
  for dim in ("valence", "arousal"):
    assert got[dim]["rmse"] == pytest.approx(0.0, abs=1e-7)
    assert got[dim]["ccc"] == pytest.approx(1.0, abs=1e-6)
    assert got[dim]["pcc"] == pytest.approx(1.0, abs=1e-6)
    assert got[dim]["sagr"] == 1.0


def test_va_constant_offset():
  # p = g + .2 with g = (-.7, -.1, .1, .7):
  #   var_g = var_p = (.49 + .01 + .01 + .49) / 4 = .25, means 0 and .2,
  #   cov = .25, so PCC = 1 but
  #   CCC = 2 * .25 / (.25 + .25 + .2**2) = .5 / .54 = 25/27;
  #   RMSE = .2; SAGR: signs (-,-,+,+) vs p = (-.5, .1, .3, .9): (-,+,+,+) -> 3/4.
  g = np.array([-.7, -.1, .1, .7])
  target = np.stack([g, g], axis=1)
  got = _va_metrics(target, target + 0.2)
  for dim in ("valence", "arousal"):
    assert got[dim]["pcc"] == pytest.approx(1.0, abs=1e-6)
    assert got[dim]["ccc"] == pytest.approx(25 / 27, abs=1e-6)
    assert got[dim]["ccc"] < 1.0
    assert got[dim]["rmse"] == pytest.approx(0.2, abs=1e-6)
    assert got[dim]["sagr"] == 0.75


def test_va_constant_prediction_has_zero_ccc():
  # cov = 0 and var_p = 0: CCC = 0 / (var_g + (mean_p - mean_g)^2) = 0. PCC is
  # undefined (EmoNet's np.corrcoef gives NaN); fer_jax reports 0.
  target = np.array([[-.5, .5], [.5, -.5], [.25, .25], [-.25, -.25]])
  got = _va_metrics(target, np.full_like(target, 0.1))
  for dim in ("valence", "arousal"):
    assert got[dim]["ccc"] == pytest.approx(0.0, abs=1e-12)
    assert got[dim]["pcc"] == 0.0


def test_va_random_against_the_reference():
  rng = np.random.default_rng(3)
  target = rng.uniform(-1, 1, (400, 2))
  # Correlated, biased, scaled, and often outside [-1, 1] so clipping matters.
  pred = 1.3 * target + 0.15 + rng.normal(0, 0.4, target.shape)
  assert np.mean(np.abs(pred) > 1) > 0.1
  target, pred = target.astype(np.float32), pred.astype(np.float32)
  got = _va_metrics(target, pred)
  for i, dim in enumerate(("valence", "arousal")):
    ref = _ref_va(target[:, i], pred[:, i])
    for name, value in ref.items():
      assert got[dim][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (dim, name)
    assert 0.0 < got[dim]["ccc"] < got[dim]["pcc"] < 1.0
