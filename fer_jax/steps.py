"""The jitted train and eval steps.

One train step is ONE XLA program: it draws the batch from the device-resident
training set (or takes a streamed batch), augments it, runs the frozen
teacher, the student's forward and backward pass and every loss term, and
applies the optimizer update. The train state is a plain dict pytree:

  ``step`` (int32), ``rng`` (a raw uint32 key), ``params`` (``{'model',
  'objective'}``), ``batch_stats``, ``opt_state``, ``averaged`` (the moving
  average of the model's variables, when the phase keeps one), plus whatever the
  phase's step plug-in keeps (``fer_jax.plugins``; MoCo's momentum encoder and queue).

A step whose loss or gradients are not finite leaves the state unchanged and
reports ``finite = 0``; the trainer stops with a diagnosis.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fer_jax import plugins
from fer_jax.data import occlusion
from fer_jax.objectives import ModelOutput, Objective


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a phase's train step."""
  model: nn.Module
  objective: Objective
  tx: optax.GradientTransformation
  augment_config: Any
  batch_size: int
  mesh: jax.sharding.Mesh
  teacher: nn.Module | None = None
  teacher_dtype: Any = jnp.float32
  student_input: tuple[int, int, int] | None = None
  teacher_input: tuple[int, int, int] | None = None
  device_resident: bool = True
  plugin: Any = plugins.SingleView()
  ema_decay: float = 0.0


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharded(mesh):
  return NamedSharding(mesh, P("data"))


# Feistel rounds of the epoch permutation. Luby & Rackoff's four rounds hold for
# wide halves; on 2-bit halves (n = 10) four rounds placed pairs of items far from
# uniformly (chi-square 466 against a 0.999 quantile of 135) and eight pass.
FEISTEL_ROUNDS = 8


def epoch_permutation(key, positions, n: int):
  """``perm[positions]`` of a pseudo-random permutation of ``range(n)`` fixed by ``key``.

  A Feistel network on the smallest even bit width covering ``n``, walked along
  its cycles until it lands inside ``range(n)``: only the batch's positions are
  computed, where ``jax.random.permutation`` sorts all ``n`` indices twice (3 %
  of the CPU tier's student step).
  """
  half_bits = max(1, -(-max(n - 1, 1).bit_length() // 2))
  mask = jnp.uint32((1 << half_bits) - 1)
  round_keys = jax.random.split(key, FEISTEL_ROUNDS)
  round_fn = jax.vmap(lambda k, r: jax.random.bits(jax.random.fold_in(k, r), dtype=jnp.uint32),
                      in_axes=(None, 0))

  def feistel(x):
    left, right = x >> half_bits, x & mask
    for i in range(FEISTEL_ROUNDS):
      left, right = right, left ^ (round_fn(round_keys[i], right) & mask)
    return (left << half_bits) | right

  walk = lambda x: jnp.where(x >= n, feistel(x), x)
  index = jax.lax.while_loop(lambda x: jnp.any(x >= n), walk,
                             feistel(positions.astype(jnp.uint32)))
  return index.astype(jnp.int32)


def sample_batch(data, step, rng, batch_size):
  """Epoch-wise shuffled batch ``step`` of the device-resident ``data``.

  The permutation depends only on (rng, epoch), so the data position is the
  step counter itself and resuming from a checkpoint continues exactly.
  """
  n = data["label"].shape[0]
  steps_per_epoch = n // batch_size
  epoch = step // steps_per_epoch
  positions = (step % steps_per_epoch) * batch_size + jnp.arange(batch_size)
  idx = epoch_permutation(jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), epoch),
                          positions, n)
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)


def adapt_input(images, shape: tuple[int, int, int] | None):
  """Resizes (bilinear) and converts channels (grey <-> RGB) to a model's input shape."""
  if shape is None:
    return images
  height, width, channels = shape
  if images.shape[1:3] != (height, width):
    images = jax.image.resize(images, (images.shape[0], height, width, images.shape[3]),
                              "bilinear")
  if images.shape[3] != channels:
    if channels == 3 and images.shape[3] == 1:
      images = jnp.repeat(images, 3, axis=3)
    elif channels == 1:
      images = jnp.mean(images, axis=3, keepdims=True)
    else:
      raise ValueError(f"cannot convert {images.shape[3]} channels to {channels}")
  return images


def _teacher_forward(spec: StepSpec, teacher_vars, images):
  images = adapt_input(images, spec.teacher_input)
  variables = jax.tree.map(lambda x: x.astype(spec.teacher_dtype)
                           if jnp.issubdtype(x.dtype, jnp.floating) else x, teacher_vars)
  logits, aux = spec.teacher.apply(variables, images.astype(spec.teacher_dtype), train=False)
  to_f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.lax.stop_gradient(ModelOutput(to_f32(logits), jax.tree.map(to_f32, dict(aux))))


def average_variables(state, new_state, decay: float) -> dict:
  """``state['averaged']`` moved towards the model's new variables.

  The decay warms up as (1 + step) / (10 + step), as in TensorFlow's
  ExponentialMovingAverage with ``num_updates``: over a short run a fixed
  0.999 would still remember the random initialisation.
  """
  step = state["step"].astype(jnp.float32)
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  current = {"params": new_state["params"]["model"], "batch_stats": new_state["batch_stats"]}
  return optax.incremental_update(current, state["averaged"], 1.0 - rate)


def make_train_step(spec: StepSpec, instrument: Callable = lambda f: f) -> Callable:
  """Returns ``step(state, weights, teacher_vars, data) -> (state, metrics)``, jitted.

  ``data`` is the whole device-resident training set when
  ``spec.device_resident`` (the batch is drawn inside the step), else one
  global batch. ``weights`` maps term names to float32 scalars.
  ``instrument`` wraps the Python step before jit (tests count traces with it).
  """
  mesh, plugin = spec.mesh, spec.plugin

  def loss_fn(params, state, inputs, images, rng, weights):
    (logits, aux), new_model_state = spec.model.apply(
        {"params": params["model"], "batch_stats": state["batch_stats"]}, images,
        train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    inputs = dict(inputs, student=ModelOutput(logits, dict(aux)))
    term_losses = spec.objective.apply({"params": params["objective"]}, inputs, True)
    total = sum(weights[name] * value for name, value in term_losses.items())
    return total, (term_losses, new_model_state["batch_stats"], logits)

  def step_fn(state, weights, teacher_vars, data):
    key = jax.random.fold_in(state["rng"], state["step"])
    k_aug, k_plugin, k_dropout = jax.random.split(key, 3)
    batch = (sample_batch(data, state["step"], state["rng"], spec.batch_size)
             if spec.device_resident else data)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharded(mesh))
    images, batch = plugin.views(k_aug, batch, spec.augment_config)
    images = jax.lax.with_sharding_constraint(images, batch_sharded(mesh))
    student_images = adapt_input(images, spec.student_input)
    inputs = {"batch": batch,
              **plugin.inputs(state, spec.model, student_images, k_plugin)}
    if spec.teacher is not None:
      inputs["teacher"] = _teacher_forward(spec, teacher_vars, images)
    (total, (term_losses, batch_stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"], state, inputs, student_images, k_dropout,
                               weights)
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                     opt_state=opt_state, batch_stats=batch_stats)
    new_state.update(plugin.update(state, new_state, inputs))
    if spec.ema_decay:
      new_state["averaged"] = average_variables(state, new_state, spec.ema_decay)
    # The global norm is finite iff every gradient is. A cond (not a per-leaf
    # where) keeps the guard to one op: per-leaf selects tripled XLA:CPU's
    # compile time of the step.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: dict(state))
    new_state["step"] = state["step"] + 1
    metrics = {"loss": total, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
               **{f"loss/{name}": value for name, value in term_losses.items()},
               **plugin.metrics(logits, batch)}
    return new_state, metrics

  repl, data_sharding = replicated(mesh), (
      replicated(mesh) if spec.device_resident else batch_sharded(mesh))
  return jax.jit(instrument(step_fn), in_shardings=(repl, repl, repl, data_sharding),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def make_predict(forward: Callable, mesh) -> Callable:
  """Jits ``forward(variables, images_uint8) -> (logits, va)`` with the batch sharded.

  ``forward`` is ``TrainedModel.forward`` (fer_jax.model_dir): evaluation uses
  the preprocessing a saved model carries.
  """

  def predict(variables, images):
    return forward(variables, jax.lax.with_sharding_constraint(images, batch_sharded(mesh)))

  return jax.jit(predict, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)))


def make_occlude(mesh, occlusion_kind: str, occlusion_seed: int = 0) -> Callable:
  """Returns jitted ``occlude(images_uint8, indices) -> images_uint8``: the fixed,
  per-index test protocol of ``fer_jax.data.occlusion``.

  It is its own program, not part of ``predict``, so that every model evaluates
  the occluded test images with the one predict program it already compiled.
  """

  def occlude(images, indices):
    return occlusion.occlude_fixed(images, indices, occlusion_kind, seed=occlusion_seed)

  # Replicated out: every process reads the whole occluded batch back.
  return jax.jit(occlude, in_shardings=(batch_sharded(mesh), batch_sharded(mesh)),
                 out_shardings=replicated(mesh))
