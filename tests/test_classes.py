"""Class orders: every dataset's native order maps onto both canonical orders."""
import numpy as np
import pytest

from fer_jax.data import classes

# Native orders as published, written out here rather than imported.
RAFDB = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
FERPLUS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
           "fear", "contempt")
AFFECTNET = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger",
             "contempt")
FER2013 = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_canonical_orders_are_the_published_ones():
  assert classes.FER7 == FER2013
  assert classes.AFFECTNET8 == AFFECTNET
  assert classes.FERPLUS8 == FERPLUS
  assert classes.RAFDB7 == RAFDB


@pytest.mark.parametrize("names, to_names, drop, expected", [
    (RAFDB, classes.FER7, (), [5, 2, 1, 3, 4, 0, 6]),
    (RAFDB, classes.AFFECTNET8, (), [3, 4, 5, 1, 2, 6, 0]),
    (FERPLUS, classes.FER7, ("contempt",), [6, 3, 5, 4, 0, 1, 2, -1]),
    (FERPLUS, classes.AFFECTNET8, (), [0, 1, 3, 2, 6, 5, 4, 7]),
    (AFFECTNET, classes.FER7, ("contempt",), [6, 3, 4, 5, 2, 1, 0, -1]),
    (AFFECTNET, classes.AFFECTNET8, (), [0, 1, 2, 3, 4, 5, 6, 7]),
    (FER2013, classes.FER7, (), [0, 1, 2, 3, 4, 5, 6]),
    (FER2013, classes.AFFECTNET8, (), [6, 5, 4, 1, 2, 3, 0]),
])
def test_dataset_orders_map_to_canonical_orders(names, to_names, drop, expected):
  np.testing.assert_array_equal(classes.mapping(names, to_names, drop), expected)


@pytest.mark.parametrize("names", [RAFDB, FERPLUS, AFFECTNET, FER2013])
def test_round_trip_through_affectnet8_restores_labels(names):
  labels = np.array([i % len(names) for i in range(23)])
  there = classes.remap(labels, names, classes.AFFECTNET8)
  back = classes.remap(there, classes.AFFECTNET8, names, drop=("contempt",))
  np.testing.assert_array_equal(back, labels)


def test_round_trip_through_fer7_drops_only_contempt():
  labels = np.arange(8)
  there = classes.remap(labels, FERPLUS, classes.FER7, drop=("contempt",))
  back = classes.remap(there, classes.FER7, FERPLUS)
  np.testing.assert_array_equal(back, [0, 1, 2, 3, 4, 5, 6, -1])


def test_aliases_ignore_case_and_codes():
  got = classes.mapping(["HA", "Angry", "Sadness", "afraid"], classes.FER7)
  assert got.tolist() == [3, 0, 4, 2]


def test_unknown_name_raises_naming_it():
  with pytest.raises(ValueError, match="'boredom'"):
    classes.mapping(["happy", "boredom"], classes.FER7)


def test_class_without_counterpart_raises_naming_it():
  with pytest.raises(ValueError, match="contempt"):
    classes.mapping(FERPLUS, classes.FER7)


def test_duplicate_class_raises():
  with pytest.raises(ValueError, match="twice"):
    classes.mapping(["happy", "happiness"], classes.FER7)


def test_remap_rejects_out_of_range_labels():
  with pytest.raises(ValueError, match=r"\[7\]"):
    classes.remap([0, 7], FER2013, classes.AFFECTNET8)
