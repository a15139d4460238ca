"""Step plug-ins: what a phase adds to the core train step of ``fer_jax.steps``.

A plug-in decides the views a step trains on, may add inputs for the loss
terms beside 'student', 'teacher' and 'batch', may keep state of its own in
the train state, and updates that state after the optimizer step. The core
step calls the same hooks for every phase; ``SingleView`` (one augmented view,
nothing added) is the default, and ``MoCo`` makes a phase contrastive.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from fer_jax import losses
from fer_jax.data import augment as augment_lib
from fer_jax.objectives import ModelOutput
from fer_jax.registry import Registry

PLUGINS = Registry("step plug-in")


@PLUGINS.register("")
@dataclasses.dataclass(frozen=True)
class SingleView:
  """Supervised training: one augmented view per image."""

  def init_state(self, rng, variables, output_shapes) -> dict:
    return {}

  def views(self, key, batch, augment_config):
    return augment_lib.augment(key, batch["image"], augment_config), batch

  def inputs(self, state, model, images, rng) -> dict:
    return {}

  def update(self, state, new_state, inputs) -> dict:
    return {}

  def metrics(self, logits, batch) -> dict:
    return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def sources(self, student_layers) -> dict[str, tuple[str, ...]]:
    """The inputs this plug-in adds for the loss terms: {source: names}."""
    return {}


@PLUGINS.register("moco")
@dataclasses.dataclass(frozen=True)
class MoCo:
  """MoCo v2 (He et al. 2020; Chen et al. 2020): two views, a momentum encoder and a queue.

  State: ``ema`` (the momentum encoder's variables), ``queue`` ``[K, D]``
  (unit-norm keys) and ``queue_ptr``. Inputs for the terms: ``'momentum'``,
  the momentum encoder's outputs on the views swapped ([v2; v1] for the
  student's [v1; v2]), and ``'queue'`` with ``'keys'``.
  """
  queue_size: int = 8192
  ema_momentum: float = 0.999

  def init_state(self, rng, variables, output_shapes) -> dict:
    dim = output_shapes.aux["projection"].shape[-1]
    queue = jax.random.normal(jax.random.fold_in(rng, 1), (self.queue_size, dim))
    # A copy: the step donates its state, and on one device an alias of the
    # online parameters would be the same buffer donated twice.
    ema = jax.tree.map(jnp.copy, {"params": variables["params"],
                                  "batch_stats": variables.get("batch_stats", {})})
    return {"queue": queue / jnp.linalg.norm(queue, axis=-1, keepdims=True),
            "queue_ptr": jnp.int32(0), "ema": ema}

  def views(self, key, batch, augment_config):
    k1, k2 = jax.random.split(key)
    images = jnp.concatenate([augment_lib.augment(k1, batch["image"], augment_config),
                              augment_lib.augment(k2, batch["image"], augment_config)])
    return images, jax.tree.map(lambda x: jnp.concatenate([x, x]), batch)

  def inputs(self, state, model, images, rng) -> dict:
    swapped = jnp.roll(images, images.shape[0] // 2, axis=0)
    (logits, aux), _ = model.apply(state["ema"], swapped, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    momentum = jax.lax.stop_gradient(ModelOutput(logits, dict(aux)))
    return {"momentum": momentum, "queue": {"keys": state["queue"]}}

  def update(self, state, new_state, inputs) -> dict:
    m = self.ema_momentum
    ema_params = optax.incremental_update(new_state["params"]["model"],
                                          state["ema"]["params"], 1 - m)
    keys = inputs["momentum"].aux["projection"]
    queue, ptr = losses.update_queue(state["queue"], keys[:keys.shape[0] // 2],
                                     state["queue_ptr"])
    return {"ema": {"params": ema_params, "batch_stats": new_state["batch_stats"]},
            "queue": queue, "queue_ptr": ptr}

  def metrics(self, logits, batch) -> dict:
    return {}  # no labels are used: a contrastive phase has no training accuracy

  def sources(self, student_layers) -> dict[str, tuple[str, ...]]:
    return {"momentum": tuple(student_layers), "queue": ("keys",)}
