"""Evaluation of a trained model on the splits the data config declares.

The evaluators of a run are declared by ``config.data``: the test split
(``test_split``, clean), any extra test splits (``extra_test_splits``: the RAN
occlusion and pose lists of FERPlus), and the test split under each synthetic
occluder of ``occlusion_kinds`` (the fixed protocol of
``fer_jax.data.occlusion``), whose mean is reported as
``<test>_occluded/accuracy``. Every split gets accuracy, mean-class accuracy
and a confusion matrix, plus RMSE/CCC/PCC/SAGR of valence and arousal when
the model has a V/A head and the split has targets.

The clean test split is also scored with test-time flip averaging (the mean
of the class probabilities of each face and its mirror image), reported as
``<test>/flip_accuracy`` beside, never instead of, the single-view accuracy.

One jitted predict program per model serves validation, test and every
occluded test (a second one, the flip-averaged, serves the clean test once).

Command line, a model directory (or a pretrained name) on a data preset:
  python -m fer_jax.evaluate --model=fer2013-student --data=fer2013
prints the results as JSON (``--out`` also writes them).
"""
import contextlib
import json
import math
import pathlib
import sys

import jax
import numpy as np
from absl import flags, logging

from fer_jax import cli
from fer_jax import metrics as metrics_lib
from fer_jax import model_dir
from fer_jax import steps


def _padded_batches(arrays, batch_size, *fields):
  """Yields (count, padded arrays of ``fields``) over a split in whole batches."""
  n = len(arrays["label"])
  batch_size = math.ceil(batch_size / jax.device_count()) * jax.device_count()
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    yield stop - start, [np.concatenate([arrays[f][start:stop],
                                         np.zeros((pad, *arrays[f].shape[1:]), arrays[f].dtype)])
                         for f in fields]


def _sharded(batch: np.ndarray, mesh) -> jax.Array:
  """A host batch, the same on every process, as a global array sharded over ``mesh``.

  A jit accepts host arrays only while it runs on one process; with several,
  each process places its own devices' rows of the global batch.
  """
  return jax.device_put(batch, steps.batch_sharded(mesh))


def predict_split(predict, variables, arrays, batch_size, mesh):
  """Runs ``predict`` over a whole split in padded, sharded batches."""
  logits, va = [], []
  for count, (images,) in _padded_batches(arrays, batch_size, "image"):
    out = jax.device_get(predict(variables, _sharded(images, mesh)))
    logits.append(out[0][:count])
    va.append(out[1][:count])
  return np.concatenate(logits), np.concatenate(va)


def occluded_split(arrays: dict, kind: str, seed: int, mesh, batch_size: int) -> dict:
  """``arrays`` under the fixed test occluder ``kind``."""
  occlude = steps.make_occlude(mesh, kind, seed)
  images = [jax.device_get(occlude(_sharded(img, mesh), _sharded(idx, mesh)))[:count]
            for count, (img, idx) in _padded_batches(arrays, batch_size, "image", "index")]
  return dict(arrays, image=np.concatenate(images))


def split_metrics(arrays: dict, logits: np.ndarray, va: np.ndarray) -> dict:
  result = metrics_lib.classification(arrays["label"], logits)
  if va.shape[-1] and "valence" in arrays:
    target = np.stack([arrays["valence"], arrays["arousal"]], -1)
    result.update(metrics_lib.valence_arousal(target, va))
  return result


class Evaluator:
  """Scores one model's variables on the data's splits, occluded splits made once."""

  def __init__(self, template: model_dir.TrainedModel, arrays: dict, data_cfg, mesh,
               batch_size: int):
    self.arrays, self.data_cfg, self.mesh = arrays, data_cfg, mesh
    self.batch_size = batch_size
    self.predict = steps.make_predict(template.forward, mesh)
    self.predict_flipped = steps.make_predict(model_dir.flip_averaged(template.forward), mesh)

  def split(self, name: str) -> dict:
    """A loaded split, or ``<test split>_occluded_<kind>`` made (and kept) on first use."""
    if name not in self.arrays:
      source, marker, kind = name.rpartition("_occluded_")
      if not marker or source not in self.arrays:
        raise KeyError(f"no split {name!r}; loaded: {', '.join(sorted(self.arrays))}")
      self.arrays[name] = occluded_split(self.arrays[source], kind,
                                         self.data_cfg.occlusion_seed, self.mesh,
                                         self.batch_size)
    return self.arrays[name]

  def metrics(self, variables, name: str) -> dict:
    arrays = self.split(name)
    logits, va = predict_split(self.predict, variables, arrays, self.batch_size, self.mesh)
    return split_metrics(arrays, logits, va)

  def test_splits(self) -> list[str]:
    data = self.data_cfg
    return [data.test_split, *data.extra_test_splits,
            *(f"{data.test_split}_occluded_{k}" for k in data.occlusion_kinds)]

  def evaluate(self, variables) -> tuple[dict, dict]:
    """``({"<split>/<metric>": value}, {split: confusion})`` over the declared splits."""
    data = self.data_cfg
    results = {f"{data.eval_split}/accuracy": self.metrics(variables, data.eval_split)["accuracy"]}
    confusion, occluded = {}, []
    for split in self.test_splits():
      values = self.metrics(variables, split)
      matrix = values.pop("confusion")
      if "_occluded_" in split:
        occluded.append(values["accuracy"])
      else:
        confusion[split] = matrix
      results.update({f"{split}/{k}": v for k, v in values.items()})
    if occluded:
      results[f"{data.test_split}_occluded/accuracy"] = float(np.mean(occluded))
    test = self.arrays[data.test_split]
    logits, _ = predict_split(self.predict_flipped, variables, test, self.batch_size, self.mesh)
    results[f"{data.test_split}/flip_accuracy"] = float(np.mean(logits.argmax(-1) == test["label"]))
    return results, confusion


def evaluate_model(model: model_dir.TrainedModel, data_cfg, batch_size: int = 512) -> dict:
  """Every metric of ``Evaluator.evaluate`` for a trained model, plus the selection split's."""
  from fer_jax import train  # pylint: disable=g-import-not-at-top  # train imports this module
  mesh = train.make_mesh()
  _, arrays = train.load_data(data_cfg)
  evaluator = Evaluator(model, arrays, data_cfg, mesh, batch_size)
  results, _ = evaluator.evaluate(jax.device_put(model.variables, steps.replicated(mesh)))
  return results


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from fer_jax import config_utils  # pylint: disable=g-import-not-at-top
  # The output is the JSON on stdout; INFO lines (JAX's backend probing) would bury
  # an error line on stderr.
  logging.set_verbosity(logging.WARNING)
  # stdout carries the JSON alone: building a dataset on first use prints TFDS's notes
  # and progress bars, which go to stderr instead.
  with cli.bad_input_exits(model_dir.ModelDirError), contextlib.redirect_stdout(sys.stderr):
    model = model_dir.load(flags.FLAGS.model)
    data_cfg = config_utils.data_config(flags.FLAGS.data)
    results = evaluate_model(model, data_cfg)
  text = json.dumps(results, indent=1)
  print(text)
  if flags.FLAGS.out:
    pathlib.Path(flags.FLAGS.out).write_text(text + "\n")


if __name__ == "__main__":
  # Defined here, not on import: fer_jax.train imports this module beside other CLIs.
  flags.DEFINE_string("model", None, "A model directory or a pretrained model's name.")
  flags.DEFINE_string("data", "fer2013", "A data preset (fer_jax.config_utils.data_config).")
  flags.DEFINE_string("out", "", "Also write the results (JSON) to this file.")
  flags.mark_flags_as_required(["model"])
  cli.run(main)
