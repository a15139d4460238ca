"""The shipped models: load offline by name and score what their model card says."""
import numpy as np
import pytest

import fixtures  # tests/fixtures.py, on the path as a sibling test module
import fer_jax
from fer_jax import model_dir
from fer_jax import predict
from fer_jax.data.tfds_builders import fer2013
from fer_jax.data.tfds_builders import ferplus

# fer_jax/pretrained/README.md, measured by the training runs on the same faces:
# name -> (dataset, architecture, a model_kwargs item, {split: accuracy}).
CARD = {
    "fer2013-student": ("fer2013", "vgg_fer", ("width", 9),
                        {"public_test": 0.6601, "private_test": 0.6626}),
    "fer2013-student-w16": ("fer2013", "vgg_fer", ("width", 16),
                            {"public_test": 0.6640, "private_test": 0.6810}),
    "fer2013-teacher": ("fer2013", "afnet", ("num_regions", 0),
                        {"public_test": 0.6737, "private_test": 0.6815}),
    "ferplus-teacher": ("ferplus", "afnet", ("num_regions", 0),
                        {"validation": 0.8628, "test": 0.8576}),
    "ferplus-student": ("ferplus", "vgg_fer", ("width", 9),
                        {"validation": 0.8468, "test": 0.8357}),
}
# FER+'s order is that of fer2013new.csv's vote columns.
CLASS_NAMES = {"fer2013": fixtures.FER7,
               "ferplus": ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                           "fear", "contempt")}
SCORED = [(name, split) for name, card in sorted(CARD.items()) for split in card[3]]


def test_the_shipped_models_are_the_cards():
  assert model_dir.pretrained_names() == sorted(CARD)


def test_predict_uses_the_fer2013_student_best_on_public_test():
  """The selection rule: PublicTest picks, PrivateTest only reports."""
  students = [name for name, card in CARD.items() if card[0] == "fer2013" and "student" in name]
  assert predict.DEFAULT_MODEL == max(students, key=lambda name: CARD[name][3]["public_test"])


@pytest.mark.parametrize("name", sorted(CARD))
def test_loads_by_name_with_its_preprocessing(name):
  dataset, architecture, (key, value), _ = CARD[name]
  model = model_dir.load(name)
  assert (model.model, model.image_shape, model.num_va) == (architecture, (48, 48, 1), 0)
  assert model.model_kwargs[key] == value
  assert model.class_names == CLASS_NAMES[dataset]
  assert fer_jax.load(name).class_names == model.class_names


def _labelled_faces(shared_data, dataset: str, split: str):
  """FER2013's faces of ``split`` with their labels (FER+: majority votes, FER+'s rule)."""
  if dataset == "fer2013":
    with np.load(shared_data / "fer2013" / "fer2013.npz") as data:
      chosen = data["usage"] == fer2013.SPLITS.index(split)
      return data["pixels"][chosen][..., None], data["emotion"][chosen]
  table = ferplus.read_votes(shared_data)
  rows = np.flatnonzero((table.usage == ferplus.SPLITS.index(split)) & (table.names != ""))
  targets = {i: ferplus.ferplus_target(table.votes[i], "majority") for i in rows}
  kept = [i for i in rows if targets[i] is not None]
  return table.pixels[kept][..., None], np.array([np.argmax(targets[i]) for i in kept])


@pytest.mark.parametrize("name,split", SCORED)
def test_accuracy_is_the_model_cards(shared_data, name, split):
  images, labels = _labelled_faces(shared_data, CARD[name][0], split)
  logits, _ = model_dir.load(name).apply(images)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert accuracy == pytest.approx(CARD[name][3][split], abs=1e-4)
