"""The shipped FER2013 students: load offline by name and score what their model card says."""
import numpy as np
import pytest

import fer_jax
from fer_jax import model_dir
from fer_jax import predict

# fer_jax/pretrained/README.md, measured by the training runs on the same faces.
CARD = {"fer2013-student": (9, {"public_test": 0.6442, "private_test": 0.6570}),
        "fer2013-student-w16": (16, {"public_test": 0.6640, "private_test": 0.6810})}


def test_the_shipped_models_are_the_cards():
  assert model_dir.pretrained_names() == sorted(CARD)


def test_predict_uses_the_shipped_model_best_on_public_test():
  """The selection rule: PublicTest picks, PrivateTest only reports."""
  assert predict.DEFAULT_MODEL == max(CARD, key=lambda name: CARD[name][1]["public_test"])


@pytest.mark.parametrize("name", sorted(CARD))
def test_loads_by_name_with_its_preprocessing(name):
  model = model_dir.load(name)
  assert (model.model, model.image_shape, model.num_va) == ("vgg_fer", (48, 48, 1), 0)
  assert model.model_kwargs["width"] == CARD[name][0]
  assert model.class_names == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
  assert fer_jax.load(name).class_names == model.class_names


@pytest.mark.parametrize("name", sorted(CARD))
@pytest.mark.parametrize("split,usage", [("public_test", 1), ("private_test", 2)])
def test_accuracy_is_the_model_cards(shared_data, name, split, usage):
  with np.load(shared_data / "fer2013" / "fer2013.npz") as data:
    chosen = data["usage"] == usage
    images, labels = data["pixels"][chosen][..., None], data["emotion"][chosen]
  logits, _ = model_dir.load(name).apply(images)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert accuracy == pytest.approx(CARD[name][1][split], abs=1e-4)
