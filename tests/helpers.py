"""Tiny configs and set-up shared by the tests."""
import importlib.metadata
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from fer_jax import config_utils as cu
from fer_jax import phase as phase_lib
from fer_jax import steps
from fer_jax import train
from fer_jax.data.augment import default_augment_config

TINY = dict(stem="small", width=4)


def normal(seed: int, shape) -> np.ndarray:
  """Standard normal float32 test data, drawn by numpy: every eager ``jax.random``
  draw of a new shape compiles its own program (0.4-5 s each on 2 cores)."""
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def tiny_config(steps_per_phase=4) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "tiny"
  config.seed = 0
  config.data = cu.data_config("synthetic")
  config.data.split_sizes = {"train": 64, "validation": 16, "test": 16}
  config.data.occlusion_kinds = ("eyes",)
  config.augment = default_augment_config()
  config.augment.occlusion_prob = 0.5
  config.eval_batch_size = 16
  config.phases = ("teacher", "student")
  common = dict(epochs=1, batch_size=16, optimizer=cu.optimizer_config("sgd", lr=0.05),
                steps=steps_per_phase, log_every_steps=1)
  config.teacher = cu.phase_config("resnet18", TINY, {"ce": dict(weight=1.0)}, **common)
  config.student = cu.phase_config(
      "resnet18", TINY,
      {"ce": dict(weight=0.5),
       "kd": dict(kind="hinton_kd", weight=0.5, temperature=4.0),
       "mkd": dict(pairs=(("stage3", "stage3"), ("stage4", "stage4"))),
       "at": dict(kind="attention_transfer", weight=10.0, pairs=(("stage3", "stage3"),))},
      teacher="teacher", **common)
  return config


def data_of(config):
  dataset, arrays = train.load_data(config.data)
  return phase_lib.DataInfo.of(dataset.class_names, arrays[config.data.train_split]), arrays


def untrained(config, mesh, name="student"):
  """Phase ``name`` set up and initialised (earlier phases untrained), with the arrays."""
  data, arrays = data_of(config)
  return train.untrained_phases(config, data, mesh)[name], arrays


def run_steps(phase, arrays, mesh, n, instrument=lambda f: f, weights=None, teacher="teacher"):
  """``n`` train steps of an untrained phase; returns (step_fn, state, metrics, inputs)."""
  step_fn = steps.make_train_step(phase.spec, instrument)
  data = jax.device_put(arrays["train"], steps.replicated(mesh))
  teacher_vars = jax.device_put(phase.teacher_variables, steps.replicated(mesh))
  state = phase.state
  for i in range(n):
    w = weights(i) if weights else phase.program.weights
    state, metrics = step_fn(state, jax.device_put(w, steps.replicated(mesh)), teacher_vars,
                             data)
  return step_fn, state, metrics, (teacher_vars, data)


def restore_raw(directory):
  """(latest step, state as numpy) of a checkpoint directory, whatever mesh wrote it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(directory)
  step = mgr.latest_step()
  mgr.close()
  path = pathlib.Path(directory) / str(step) / "state"
  with ocp.PyTreeCheckpointer() as reader:
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            reader.metadata(path).item_metadata.tree)
    return step, reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def mtcnn_weights(folder):
  """The MTCNN weights converted into ``folder`` (never the home cache); skips the test
  when the ``mtcnn`` wheel they come from is not installed."""
  try:
    importlib.metadata.distribution("mtcnn")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("mtcnn==1.0.0 (the detector weights' source) is not installed")
  from fer_jax.detect import mtcnn  # pylint: disable=g-import-not-at-top
  return mtcnn.convert_weights(folder / f"mtcnn-{mtcnn.MTCNN_VERSION}.npz")
