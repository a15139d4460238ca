"""Linear evaluation in closed form: ridge regression on a frozen model's pooled embedding.

A cross-check of the ASDC linear probe, which trains its head with SGD: if a ridge
classifier on the same frozen embedding does no better, the representation, not the
probe's optimisation, sets the accuracy. The embedding is standardised on the training
split; the ridge weight is chosen on the selection split (FER2013: PublicTest) and the
accuracy reported on the test split (PrivateTest). ``--model=pixels`` uses the raw pixels.

  python -m experiments.frozen_ridge --model=RUN/teacher/model --data=fer2013
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fer_jax import cli
from fer_jax import config_utils
from fer_jax import evaluate
from fer_jax import model_dir
from fer_jax import train

FLAGS = flags.FLAGS
RIDGE_WEIGHTS = tuple(10.0 ** k for k in range(-2, 7))


def embed(model: model_dir.TrainedModel | None, splits: dict, mesh) -> dict:
  """{split: ``[N, D]`` pooled embeddings} (flattened pixels without a model); one program
  serves every split."""
  if model is None:
    return {name: a["image"].reshape(len(a["image"]), -1).astype(np.float32) / 255.0
            for name, a in splits.items()}

  @jax.jit
  def predict(variables, images):
    _, aux = model.module().apply(variables, model.preprocess(images), train=False)
    return aux["embedding"], jnp.zeros((images.shape[0], 0))

  return {name: evaluate.predict_split(predict, model.variables, a, 512, mesh)[0]
          for name, a in splits.items()}


def ridge_accuracies(train_x, train_y, evaluated: dict, num_classes: int) -> dict:
  """{ridge weight: {split: accuracy}} of one-hot ridge regression with a bias."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  design = lambda x: np.c_[(x - mean) / std, np.ones(len(x))]
  x = design(train_x)
  gram, targets = x.T @ x, x.T @ np.eye(num_classes)[train_y]
  results = {}
  for weight in RIDGE_WEIGHTS:
    coefficients = np.linalg.solve(gram + weight * np.eye(len(gram)), targets)
    results[weight] = {name: float(np.mean((design(x_eval) @ coefficients).argmax(-1) == y))
                       for name, (x_eval, y) in evaluated.items()}
  return results


def main(argv):
  del argv
  with cli.bad_input_exits(model_dir.ModelDirError):
    data_cfg = config_utils.data_config(FLAGS.data)
    model = None if FLAGS.model == "pixels" else model_dir.load(FLAGS.model)
    dataset, arrays = train.load_data(data_cfg)
  names = (data_cfg.train_split, data_cfg.eval_split, data_cfg.test_split)
  embeddings = embed(model, {name: arrays[name] for name in names}, train.make_mesh())
  features = {name: (embeddings[name], arrays[name]["label"]) for name in names}
  train_x, train_y = features.pop(data_cfg.train_split)
  results = ridge_accuracies(train_x, train_y, features, len(dataset.class_names))
  best = max(results, key=lambda weight: results[weight][data_cfg.eval_split])
  print(json.dumps({"model": FLAGS.model, "dimensions": int(train_x.shape[1]),
                    "ridge_weight": best, **results[best]}))


if __name__ == "__main__":
  # Defined here, not on import: the tests import several experiments into one process.
  flags.DEFINE_string("model", None, "A model directory or pretrained name, or 'pixels'.")
  flags.DEFINE_string("data", "fer2013", "A data preset (fer_jax.config_utils.data_config).")
  flags.mark_flags_as_required(["model"])
  cli.run(main)
