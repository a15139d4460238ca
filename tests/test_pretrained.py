"""The shipped FER2013 student: loads offline by name and scores what its model card says."""
import numpy as np
import pytest

import fer_jax
from fer_jax import model_dir

# fer_jax/pretrained/README.md, measured by the training run on the same faces.
CARD = {"public_test": 0.6442, "private_test": 0.6570}


def test_loads_by_name_with_its_preprocessing():
  model = model_dir.load("fer2013-student")
  assert (model.model, model.image_shape, model.num_va) == ("vgg_fer", (48, 48, 1), 0)
  assert model.class_names == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
  assert fer_jax.load("fer2013-student").class_names == model.class_names


@pytest.mark.parametrize("split,usage", [("public_test", 1), ("private_test", 2)])
def test_accuracy_is_the_model_cards(shared_data, split, usage):
  with np.load(shared_data / "fer2013" / "fer2013.npz") as data:
    chosen = data["usage"] == usage
    images, labels = data["pixels"][chosen][..., None], data["emotion"][chosen]
  logits, _ = model_dir.load("fer2013-student").apply(images)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert accuracy == pytest.approx(CARD[split], abs=1e-4)
