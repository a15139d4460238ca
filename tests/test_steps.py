"""The fused train step: one program per phase, sharded equals single-device, donation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import config_utils as cu
from fer_jax import phase as phase_lib
from fer_jax import steps, train
from helpers import TINY, run_steps, tiny_config, untrained


def one_device_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))


def test_contrastive_state_shares_no_buffer_on_one_device():
  # The step donates its state. On one device an EMA encoder that aliases the
  # online parameters is one buffer donated twice, which XLA refuses at step 1.
  config = tiny_config()
  config.phases = ("teacher",)
  del config["student"]
  config.teacher = cu.phase_config(
      "contrastive", dict(encoder="resnet18", encoder_kwargs=TINY), {"moco": dict(weight=1.0)},
      epochs=1, steps=1, batch_size=16, optimizer=cu.optimizer_config("sgd"), plugin="moco",
      plugin_kwargs=dict(queue_size=32, ema_momentum=0.99), evaluate=False)
  mesh = one_device_mesh()
  phase, arrays = untrained(config, mesh, "teacher")
  leaves = [x for x in jax.tree.leaves(phase.state) if x.size]
  pointers = [x.unsafe_buffer_pointer() for x in leaves]
  assert len(set(pointers)) == len(pointers)
  assert {"ema", "queue", "queue_ptr"} <= set(phase.state)
  initial_queue = np.asarray(phase.state["queue"])  # copied: the step donates the state
  _, state, metrics, _ = run_steps(phase, arrays, mesh, 3)
  # Each step enqueues its 16 keys: three steps fill slots 0-15, 16-31, then 0-15 again.
  assert int(state["queue_ptr"]) == (3 * 16) % 32 == 16
  queue = np.asarray(state["queue"])
  for rows in (slice(0, 16), slice(16, 32)):
    assert not np.allclose(queue[rows], initial_queue[rows])
  assert np.all(np.isfinite(queue))  # keys stored as projected; info_nce normalises them
  assert np.isfinite(float(metrics["loss/moco"]))
  assert "accuracy" not in metrics  # no labels are used in a contrastive phase


def test_step_traces_once_is_one_program_and_donates_its_state():
  chex.clear_trace_counter()
  mesh = train.make_mesh()
  phase, arrays = untrained(tiny_config(), mesh)
  weights = lambda i: dict(phase.program.weights, kd=jnp.float32(0.1 * (i + 1)))
  step_fn, state, metrics, (teacher_vars, data) = run_steps(
      phase, arrays, mesh, 3, instrument=lambda f: chex.assert_max_traces(f, n=1),
      weights=weights)
  # Weight changes do not recompile.
  assert step_fn._cache_size() == 1
  assert int(state["step"]) == 3
  assert set(metrics) >= {"loss", "loss/ce", "loss/kd", "loss/mkd", "loss/at", "accuracy"}
  total = sum(float(weights(2)[k]) * float(metrics[f"loss/{k}"]) for k in phase.program.weights)
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-5)

  w = jax.device_put(weights(3), train.steps.replicated(mesh))
  hlo = step_fn.lower(state, w, teacher_vars, data).compile().as_text()
  for host_op in ("outfeed", "infeed", "host_callback", "xla_python_cpu_callback", " send(",
                  " recv("):
    assert host_op not in hlo, host_op
  old_leaves = jax.tree.leaves(state)
  # Every input is on the device: any transfer inside the step would raise here.
  with jax.transfer_guard("disallow"):
    state, _ = step_fn(state, w, teacher_vars, data)
  assert int(jax.device_get(state["step"])) == 4
  # The state was donated: its old buffers are gone, the teacher's and the data's are not.
  assert all(leaf.is_deleted() for leaf in old_leaves)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((teacher_vars, data)))


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 8
  results = []
  for mesh in (one_device_mesh(), train.make_mesh()):
    phase, arrays = untrained(tiny_config(), mesh)
    _, state, metrics, _ = run_steps(phase, arrays, mesh, 2)
    results.append(jax.device_get((state["params"], metrics["loss"])))
  (params_1, loss_1), (params_8, loss_8) = results
  np.testing.assert_allclose(loss_1, loss_8, rtol=1e-4)
  # Eight shards sum the batch in another order: parameters near zero (BN biases)
  # differed by up to 1.1e-5 after two steps.
  chex.assert_trees_all_close(params_1, params_8, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 37, 1000, 28709])
def test_epoch_permutation_is_a_permutation_of_range_n(n):
  perm = np.asarray(steps.epoch_permutation(jax.random.PRNGKey(n), jnp.arange(n), n))
  np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def test_epoch_permutation_places_each_ordered_pair_uniformly():
  # Where positions 0 and 1 land, over 9000 keys: 90 ordered pairs of 10 items, each
  # expected 100 times. Pearson's chi-square (89 degrees of freedom) stays under its
  # 0.999 quantile, 135.0, for a uniform random permutation.
  n, draws = 10, 9000
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  pairs = np.asarray(jax.vmap(lambda k: steps.epoch_permutation(k, jnp.arange(2), n))(keys))
  counts = np.zeros((n, n))
  np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
  assert np.all(np.diag(counts) == 0)
  expected = draws / (n * (n - 1))
  off_diagonal = counts[~np.eye(n, dtype=bool)]
  assert np.sum((off_diagonal - expected) ** 2 / expected) < 135.0


def test_sample_batch_epochs_cover_the_data_once_and_reshuffle():
  n, batch_size = 103, 10
  data = {"label": jnp.arange(n), "image": jnp.arange(n * 4.0).reshape(n, 2, 2, 1)}
  rng = jax.random.PRNGKey(7)
  epoch = lambda e: np.concatenate([
      np.asarray(steps.sample_batch(data, e * 10 + s, rng, batch_size)["label"])
      for s in range(10)])
  first, second = epoch(0), epoch(1)
  assert len(set(first)) == len(set(second)) == 100  # the last 3 wait for another epoch
  assert not np.array_equal(first, second)
  batch = steps.sample_batch(data, 13, rng, batch_size)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], 4.0 * batch["label"])
  np.testing.assert_array_equal(second[30:40], batch["label"])


def test_moving_average_of_the_variables_follows_the_warmed_up_decay():
  decay = 0.2
  config = tiny_config()
  config.phases = ("teacher",)
  del config["student"]
  config.teacher.ema_decay = decay
  mesh = one_device_mesh()
  phase, arrays = untrained(config, mesh, "teacher")
  raw = lambda state: {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
  expected = jax.device_get(raw(phase.state))
  chex.assert_trees_all_equal(jax.device_get(phase.state["averaged"]), expected)
  step_fn = steps.make_train_step(phase.spec)
  data = jax.device_put(arrays["train"], steps.replicated(mesh))
  weights = jax.device_put(phase.program.weights, steps.replicated(mesh))
  state = phase.state
  for t in range(3):
    state, _ = step_fn(state, weights, {}, data)
    # TensorFlow's ExponentialMovingAverage with num_updates = t: 0.1, 0.18, then the decay.
    rate = min(decay, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda a, v, r=rate: r * a + (1 - r) * v, expected,
                            jax.device_get(raw(state)))
  chex.assert_trees_all_close(jax.device_get(state["averaged"]), expected, rtol=1e-6, atol=1e-7)
  # The average, not the last weights, is what is validated, selected and saved.
  assert phase_lib.variables_of(state) is state["averaged"]
  last = jax.device_get(raw(state))["params"]
  assert max(np.abs(a - w).max() for a, w in zip(jax.tree.leaves(expected["params"]),
                                                 jax.tree.leaves(last))) > 1e-3
