"""Every registered model trains through the core fused step (``fer_jax.steps``).

For each name in ``fer_jax.models.MODELS`` a single-phase config (cross-entropy
only, SGD without weight decay) is built at a small width, ``train.untrained_phases``
initialises its state as the trainer does, and two jitted train steps run
sharded over the 8 fake CPU devices. The warm-up schedule gives step 1 a zero
learning rate, so step 2 is the first real update. Checked: both losses are
finite and equal the cross-entropy term; the gradient reaches every parameter
except the subtrees a family keeps out of its reach (EmoNet's FAN, the probe's
encoder; the MoCo projection head and AFNet's backbone classifier, which the
cross-entropy does not use), and those stay bit-identical; every reached
parameter moves unless its update is below float32 resolution; BatchNorm
running statistics move in training mode except where a family documents them
as fixed.

Initialising and compiling a step takes 10-90 s per model on the 2 shared CPU
cores, so the default run trains only vgg_fer (the CPU tier's net) and linear_probe
(each 20-35 s); resnet18 also trains in the default run through the tests'
tiny config (tests/test_steps.py, tests/test_train.py), but its per-parameter
checks here run with ``-m slow``. Every other case is
``@pytest.mark.slow``: afnet, contrastive, efficientformer_l1/l3, emonet (small, and
at its native 256x256x3), ir50, mini_xception, mobilefacenet, mobilenet_v2, resnet18,
resnet34 and resnet50.
"""
import dataclasses

import jax
import ml_collections
import numpy as np
import optax
import pytest

from fer_jax import config_utils as cu
from fer_jax import models
from fer_jax import phase as phase_lib
from fer_jax import steps
from fer_jax import train
from fer_jax.data.augment import default_augment_config

TINY_RESNET = dict(stem="small", width=4)
BATCH = 8  # one example per fake device


@dataclasses.dataclass(frozen=True)
class Case:
  """How to train one model small.

  Attributes:
    model: registered model name.
    kwargs: constructor fields that make it small.
    input_shape: the phase's ``input_shape``; None keeps the 48x48x1 faces.
    untouched: parameter subtrees ('a/b' paths) the cross-entropy cannot reach.
    fixed_stats: ``batch_stats`` subtrees ('a/b' paths) that stay fixed in training.
  """
  model: str
  kwargs: dict = dataclasses.field(default_factory=dict)
  input_shape: tuple[int, int, int] | None = None
  untouched: tuple[str, ...] = ()
  fixed_stats: tuple[str, ...] = ()


CASES = {
    # AFNet keeps only the backbone's aux maps, so the backbone's own classifier
    # is built but unused.
    "afnet": Case("afnet", dict(backbone="resnet18", backbone_kwargs=TINY_RESNET, fpn_dim=8,
                                num_regions=2, embed_dim=8),
                  untouched=("backbone/Heads_0",)),
    "contrastive": Case("contrastive", dict(encoder="resnet18", encoder_kwargs=TINY_RESNET,
                                            hidden=8, projection_dim=8),
                        untouched=("projection_hidden", "projection_out")),
    "efficientformer_l1": Case("efficientformer_l1"),
    "efficientformer_l3": Case("efficientformer_l3"),
    # Two head blocks and one hourglass stack take 64 px; the FAN is frozen.
    "emonet": Case("emonet", dict(n_stacks=1, num_head_blocks=2), (64, 64, 3),
                   untouched=("fan",), fixed_stats=("fan",)),
    "emonet_256": Case("emonet", {}, (256, 256, 3), untouched=("fan",), fixed_stats=("fan",)),
    "ir50": Case("ir50", dict(width=4)),
    "linear_probe": Case("linear_probe", dict(encoder="resnet18", encoder_kwargs=TINY_RESNET),
                         untouched=("encoder",), fixed_stats=("encoder",)),
    "mini_xception": Case("mini_xception"),
    "mobilefacenet": Case("mobilefacenet"),
    "mobilenet_v2": Case("mobilenet_v2", dict(width=0.25, stem="small")),
    "resnet18": Case("resnet18", TINY_RESNET),
    "resnet34": Case("resnet34", TINY_RESNET),
    "resnet50": Case("resnet50", TINY_RESNET),
    "vgg_fer": Case("vgg_fer", dict(width=4, fc_width=16)),
}
# Each 20-35 s on the 2 CPU cores; every other case takes 24-92 s.
DEFAULT_RUN = {"linear_probe", "vgg_fer"}


def single_phase_config(case: Case) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = f"train_{case.model}"
  config.seed = 0
  config.data = cu.data_config("synthetic")
  config.data.split_sizes = {"train": 2 * BATCH, "validation": BATCH, "test": BATCH}
  config.augment = default_augment_config()
  config.eval_batch_size = BATCH
  config.phases = ("single",)
  extra = {"input_shape": case.input_shape} if case.input_shape else {}
  config.single = cu.phase_config(
      case.model, case.kwargs, {"ce": dict(weight=1.0)}, epochs=1, steps=2,
      batch_size=BATCH, optimizer=cu.optimizer_config("sgd", lr=0.1, weight_decay=0.0),
      **extra)
  return config


def leaves_by_path(tree) -> dict[str, np.ndarray]:
  """``{'a/b/kernel': leaf}`` for a nested dict of arrays."""
  return {"/".join(key.key for key in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def under(path: str, prefixes) -> bool:
  return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)


def train_two_steps(config):
  """(initial state, final state, per-step metrics) of two fused steps, as numpy."""
  mesh = train.make_mesh()
  dataset, arrays = train.load_data(config.data)
  data = phase_lib.DataInfo.of(dataset.class_names, arrays[config.data.train_split])
  phase = train.untrained_phases(config, data, mesh)["single"]
  initial = jax.device_get(phase.state)  # the step donates its state
  step_fn = steps.make_train_step(phase.spec)
  train_data = jax.device_put(arrays[config.data.train_split], steps.replicated(mesh))
  weights = jax.device_put(phase.program.weights, steps.replicated(mesh))
  state, history = phase.state, []
  for _ in range(2):
    state, metrics = step_fn(state, weights, {}, train_data)
    history.append(jax.device_get(metrics))
  return initial, jax.device_get(state), history


def test_every_registered_model_has_a_case():
  assert sorted({case.model for case in CASES.values()}) == models.MODELS.names()


@pytest.mark.parametrize("case_name", [
    name if name in DEFAULT_RUN else pytest.param(name, marks=pytest.mark.slow)
    for name in CASES])
def test_model_trains_two_steps(case_name):
  case = CASES[case_name]
  config = single_phase_config(case)
  initial, final, history = train_two_steps(config)

  for step, metrics in enumerate(history, start=1):
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"]), (step, metrics)
    np.testing.assert_allclose(metrics["loss"], metrics["loss/ce"], rtol=1e-6)
  assert int(final["step"]) == 2

  # SGD's momentum trace after two steps is g2 + 0.9 g1, non-zero exactly where
  # the gradient arrived. Reach is read there because a reached parameter may
  # still not move: EfficientFormer's LayerScale (1e-5) shrinks the updates of
  # some scales (1.0) below float32 resolution.
  trace = leaves_by_path(optax.tree_utils.tree_get(final["opt_state"], "trace")["model"])
  before = leaves_by_path(initial["params"]["model"])
  after = leaves_by_path(final["params"]["model"])
  untouched = {p for p in before if under(p, case.untouched)}
  reached = {p for p in trace if np.any(trace[p])}
  moved = {p for p in before if not np.array_equal(before[p], after[p])}
  assert reached == set(before) - untouched, (
      f"{case_name}: no gradient reaches {sorted(set(before) - untouched - reached)}; "
      f"gradient reaches {sorted(reached & untouched)}")
  assert moved <= reached
  lr = config.single.optimizer.lr
  for path in reached - moved:
    # Staying put is right only where step 2's update is below float32 resolution.
    resolution = np.spacing(np.abs(before[path]))
    assert np.all(lr * np.abs(trace[path]) < 4 * resolution), (
        f"{case_name}: {path} got a gradient but did not move")

  stats_before = leaves_by_path(initial["batch_stats"])
  stats_after = leaves_by_path(final["batch_stats"])
  stats_unchanged = {p for p in stats_before
                     if np.array_equal(stats_before[p], stats_after[p])}
  assert stats_unchanged == {p for p in stats_before if under(p, case.fixed_stats)}, (
      f"{case_name}: running statistics that did not move: {sorted(stats_unchanged)}")
