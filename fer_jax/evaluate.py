"""Evaluation of a trained model on the splits the data config declares.

The evaluators of a run are declared by ``config.data``: the test split
(``test_split``, clean), any extra test splits (``extra_test_splits``: the RAN
occlusion and pose lists of FERPlus), and the test split under each synthetic
occluder of ``occlusion_kinds`` (the fixed protocol of
``fer_jax.data.occlusion``), whose mean is reported as
``<test>_occluded/accuracy``. Every split gets accuracy, mean-class accuracy
and a confusion matrix, plus RMSE/CCC/PCC/SAGR of valence and arousal when
the model has a V/A head and the split has targets.

One jitted predict program per model serves validation, test and every
occluded test.
"""
import math

import jax
import numpy as np

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


def predict_split(predict, variables, arrays, batch_size):
  """Runs ``predict`` over a whole split in padded, sharded batches."""
  logits, va = [], []
  for count, (images,) in _padded_batches(arrays, batch_size, "image"):
    out = jax.device_get(predict(variables, images))
    logits.append(out[0][:count])
    va.append(out[1][:count])
  return np.concatenate(logits), np.concatenate(va)


def occluded_split(arrays: dict, kind: str, seed: int, mesh, batch_size: int) -> dict:
  """``arrays`` under the fixed test occluder ``kind``."""
  occlude = steps.make_occlude(mesh, kind, seed)
  images = [jax.device_get(occlude(img, idx))[:count] for count, (img, idx) in
            _padded_batches(arrays, batch_size, "image", "index")]
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
    logits, va = predict_split(self.predict, variables, arrays, self.batch_size)
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
    return results, confusion
