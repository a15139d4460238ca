"""fer_jax.losses against numpy re-implementations of the published formulas.

The references below are written from the papers/reference code quoted in
each loss's docstring, in float64 numpy, without calling fer_jax.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import losses

TOL = dict(atol=1e-5, rtol=1e-5)


def _rng(seed):
  return np.random.default_rng(seed)


def _normal(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------- references


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_l2_normalize(x):
  # torch.nn.functional.normalize(x, dim=-1), eps 1e-12.
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_bilinear_matrix(size_in, size_out):
  """[out, in] weights of half-pixel bilinear resampling, edges clamped."""
  matrix = np.zeros((size_out, size_in))
  for i in range(size_out):
    src = np.clip((i + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = int(np.floor(src))
    high = min(low + 1, size_in - 1)
    matrix[i, low] += 1 - (src - low)
    matrix[i, high] += src - low
  return matrix


def np_resize(x, height, width):
  """Bilinear resize of [B, H, W, ...] (align_corners=False convention)."""
  rows = np_bilinear_matrix(x.shape[1], height)
  cols = np_bilinear_matrix(x.shape[2], width)
  return np.einsum("ph,bhw...,qw->bpq...", rows, x, cols)


def np_cross_entropy(logits, labels, smoothing):
  k = logits.shape[-1]
  target = np.eye(k)[labels] if labels.ndim == 1 else labels.astype(np.float64)
  target = (1 - smoothing) * target + smoothing / k
  return np.mean(-np.sum(target * np_log_softmax(logits.astype(np.float64)),
                         -1))


def np_hinton(student, teacher, temperature):
  # kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B
  p_t = np_softmax(teacher.astype(np.float64) / temperature)
  log_p_s = np_log_softmax(student.astype(np.float64) / temperature)
  kl = np.sum(p_t * (np.log(p_t) - log_p_s))
  return kl * temperature**2 / student.shape[0]


def np_energy(x, p):
  return np.mean(np.abs(x.astype(np.float64))**p, axis=-1)


def np_attention_map(x, p):
  energy = np_energy(x, p)
  return np_l2_normalize(energy.reshape(len(x), -1))


def np_attention_transfer(s, t, p):
  height = max(s.shape[1], t.shape[1])
  width = max(s.shape[2], t.shape[2])
  maps = [np_l2_normalize(np_resize(np_energy(x, p), height, width)
                          .reshape(len(x), -1)) for x in (s, t)]
  return np.mean((maps[0] - maps[1])**2)


def np_teacher_bounded(s, t, y, margin):
  s, t, y = (a.astype(np.float64) for a in (s, t, y))
  s_err, t_err = (s - y)**2, (t - y)**2
  if s.ndim == 2:
    s_err, t_err = s_err.sum(-1), t_err.sum(-1)
  per_sample = [e if e + margin > te else 0.0 for e, te in zip(s_err, t_err)]
  return np.mean(per_sample)


def np_ccc_emonet(ground_truth, predictions):
  """EmoNet metrics.py CCC: via PCC and population standard deviations."""
  ground_truth = ground_truth.astype(np.float64)
  predictions = predictions.astype(np.float64)
  mean_pred, mean_gt = np.mean(predictions), np.mean(ground_truth)
  std_pred, std_gt = np.std(predictions), np.std(ground_truth)
  pearson = np.corrcoef(ground_truth, predictions)[0, 1]
  return 2.0 * pearson * std_pred * std_gt / (
      std_pred**2 + std_gt**2 + (mean_pred - mean_gt)**2)


def np_info_nce(q, k, queue, temperature):
  q, k, queue = (np_l2_normalize(a.astype(np.float64)) for a in (q, k, queue))
  logits = np.concatenate([np.sum(q * k, -1, keepdims=True), q @ queue.T], -1)
  return np.mean(-np_log_softmax(logits / temperature)[:, 0])


def np_disco(s, t):
  # MSELoss(reduction='sum')(norm(s), norm(t)) / B
  diff = np_l2_normalize(s.astype(np.float64)) - np_l2_normalize(
      t.astype(np.float64))
  return np.sum(diff**2) / len(s)


def np_channel_mse(s, t):
  s = np_resize(s.astype(np.float64), *t.shape[1:3])
  return np.mean((s - t)**2, axis=-1)


def np_attention_weighted(s, t, t_att):
  a = np_attention_map(t_att, 2).reshape(t.shape[:3])
  a = a / a.mean(axis=(1, 2), keepdims=True)
  return np.mean(a * np_channel_mse(s, t))


def np_key_feature(s, t, fraction):
  b, h, w, c = t.shape
  k = max(1, round(fraction * h * w))
  s = np_resize(s.astype(np.float64), h, w).reshape(b, h * w, c)
  t = t.astype(np.float64).reshape(b, h * w, c)
  a = np_attention_map(t.reshape(b, h, w, c), 2)
  total = 0.0
  for i in range(b):
    top = np.argsort(-a[i], kind="stable")[:k]
    diff = np_l2_normalize(s[i, top]) - np_l2_normalize(t[i, top])
    total += np.sum(diff**2) / k
  return total / b


def _partial(fn, **kwargs):
  return functools.partial(fn, **kwargs)


def _jit(fn, **kwargs):
  return jax.jit(_partial(fn, **kwargs))


def _close(actual, expected, **tol):
  chex.assert_trees_all_close(np.asarray(actual, np.float64),
                              np.asarray(expected, np.float64),
                              **(tol or TOL))


# ---------------------------------------------------------------- the tests


def test_bilinear_reference_matches_jax_resize():
  """The numpy resize the references use is the convention losses.py uses."""
  x = _normal(_rng(0), 2, 5, 7, 3)
  for height, width in [(9, 4), (3, 3), (10, 14)]:
    expected = np_resize(x, height, width)
    actual = jax.image.resize(x, (2, height, width, 3), "bilinear",
                              antialias=False)
    _close(actual, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("batch,classes", [(2, 7), (5, 8)])
def test_cross_entropy_index_and_soft_labels(smoothing, batch, classes):
  rng = _rng(batch)
  logits = _normal(rng, batch, classes, scale=3.0)
  index_labels = rng.integers(0, classes, batch).astype(np.int32)
  soft_labels = np_softmax(_normal(rng, batch, classes)).astype(np.float32)
  fn = _jit(losses.cross_entropy, label_smoothing=smoothing,
            num_classes=classes)
  for labels in (index_labels, soft_labels):
    _close(fn(logits, labels), np_cross_entropy(logits, labels, smoothing))
  # A one-hot soft label is the same target as its index.
  one_hot = np.eye(classes, dtype=np.float32)[index_labels]
  _close(fn(logits, one_hot), fn(logits, index_labels))


def test_cross_entropy_rejects_mismatches():
  logits = np.zeros((2, 7), np.float32)
  with pytest.raises(ValueError, match="num_classes=8"):
    losses.cross_entropy(logits, np.zeros(2, np.int32), num_classes=8)
  with pytest.raises(ValueError, match="labels must be"):
    losses.cross_entropy(logits, np.zeros((2, 8), np.float32))
  with pytest.raises(ValueError, match="integer class indices"):
    losses.cross_entropy(logits, np.zeros(2, np.float32))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("batch,classes", [(2, 7), (3, 8)])
def test_hinton_kd_matches_reference(temperature, batch, classes):
  rng = _rng(classes)
  student = _normal(rng, batch, classes, scale=3.0)
  teacher = _normal(rng, batch, classes, scale=3.0)
  fn = _jit(losses.hinton_kd, temperature=temperature)
  _close(fn(student, teacher), np_hinton(student, teacher, temperature))
  _close(fn(student, student), 0.0, atol=1e-6)


def test_hinton_kd_gradient_is_the_closed_form():
  """d/ds T^2 KL / B = T (softmax(s/T) - softmax(t/T)) / B (Hinton §2.1)."""
  rng = _rng(3)
  student, teacher = _normal(rng, 4, 7), _normal(rng, 4, 7)
  temperature = 3.0
  grad_s, grad_t = jax.jit(jax.grad(
      _partial(losses.hinton_kd, temperature=temperature), argnums=(0, 1)))(
          student, teacher)
  expected = temperature * (np_softmax(student / temperature) -
                            np_softmax(teacher / temperature)) / 4
  _close(grad_s, expected)
  _close(grad_t, np.zeros_like(teacher))


@pytest.mark.parametrize("student_hw,teacher_hw", [((4, 4), (4, 4)),
                                                    ((8, 6), (4, 3)),
                                                    ((3, 3), (6, 5))])
def test_fitnet_hint_matches_reference(student_hw, teacher_hw):
  rng = _rng(4)
  student = _normal(rng, 2, *student_hw, 3)
  teacher = _normal(rng, 2, *teacher_hw, 3)
  expected = np.mean(np_channel_mse(student, teacher))
  _close(jax.jit(losses.fitnet_hint)(student, teacher), expected)


def test_fitnet_hint_rejects_unadapted_student():
  with pytest.raises(ValueError, match="1x1 adapter"):
    losses.fitnet_hint(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 5)))
  with pytest.raises(ValueError, match="NHWC"):
    losses.fitnet_hint(np.zeros((2, 4, 3)), np.zeros((2, 4, 4, 3)))


@pytest.mark.torch
def test_resize_convention_is_torch_interpolate():
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  rng = _rng(5)
  for student_hw in [(8, 6), (3, 2)]:
    student = _normal(rng, 2, *student_hw, 3)
    teacher = _normal(rng, 2, 4, 3, 3)
    resized = functional.interpolate(
        torch.from_numpy(student).permute(0, 3, 1, 2), size=(4, 3),
        mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    expected = functional.mse_loss(resized, torch.from_numpy(teacher))
    _close(losses.fitnet_hint(student, teacher), expected.item())


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("student_hwc,teacher_hwc", [((4, 4, 3), (4, 4, 5)),
                                                      ((2, 3, 4), (4, 6, 2)),
                                                      ((5, 5, 2), (3, 5, 2))])
def test_attention_transfer_matches_reference(p, student_hwc, teacher_hwc):
  rng = _rng(p)
  student = _normal(rng, 2, *student_hwc)
  teacher = _normal(rng, 2, *teacher_hwc)
  fn = _jit(losses.attention_transfer, p=p)
  _close(fn(student, teacher), np_attention_transfer(student, teacher, p))
  attention = jax.jit(losses.attention_map, static_argnums=1)(student, p)
  _close(attention, np_attention_map(student, p))
  _close(np.linalg.norm(attention, axis=-1), np.ones(2))


def test_spatially_weighted_feature_loss_matches_reference():
  rng = _rng(6)
  student, teacher = _normal(rng, 2, 6, 6, 4), _normal(rng, 2, 3, 3, 4)
  logits = _normal(rng, 2, 9)
  weights = np_softmax(logits).reshape(2, 3, 3).astype(np.float32)
  per_location = np_channel_mse(student, teacher)
  expected = np.sum(weights * per_location) / np.sum(weights)
  fn = jax.jit(losses.spatially_weighted_feature_loss)
  _close(fn(student, teacher, weights), expected)
  # Uniform weights reduce it to the FitNets hint.
  uniform = np.full((2, 3, 3), 5.0, np.float32)
  _close(fn(student, teacher, uniform), losses.fitnet_hint(student, teacher))
  with pytest.raises(ValueError, match="weight_map"):
    losses.spatially_weighted_feature_loss(student, teacher, weights[:, :2])


def np_standardize_channels(x, eps=1e-6):
  # mmrazor PKDLoss.norm: per channel over (N, H, W), torch's unbiased std.
  c = x.shape[-1]
  flat = x.reshape(-1, c).astype(np.float64)
  return ((flat - flat.mean(0)) / (flat.std(0, ddof=1) + eps)).reshape(x.shape)


def test_standardized_feature_losses_match_reference_and_ignore_teacher_scale():
  rng = _rng(16)
  student, teacher = _normal(rng, 3, 6, 6, 4), _normal(rng, 3, 3, 3, 4, scale=7.0) + 2.0
  weights = rng.uniform(0.1, 1.0, (3, 3, 3)).astype(np.float32)
  resized = np_resize(student.astype(np.float64), 3, 3)
  per_location = np_channel_mse(np_standardize_channels(resized),
                                np_standardize_channels(teacher))
  expected = np.sum(weights * per_location) / np.sum(weights)
  fn = jax.jit(functools.partial(losses.spatially_weighted_feature_loss, standardize=True))
  _close(fn(student, teacher, weights), expected)
  # A standardised distance is about 2 (1 - r): blind to the teacher's scale and offset.
  _close(fn(student, 10 * teacher - 3, weights), expected)
  _close(fn(teacher, teacher, weights), 0.0)
  _close(losses.standardize_channels(teacher), np_standardize_channels(teacher))
  # FitNets' hint takes the same switch: the unweighted mean of those locations.
  _close(losses.fitnet_hint(student, teacher, standardize=True), np.mean(per_location))
  # So does ASDC's attention-weighted loss, its attention taken from the raw teacher map.
  attention = np_attention_map(teacher, 2).reshape(3, 3, 3)
  attention = attention / attention.mean(axis=(1, 2), keepdims=True)
  asdc = jax.jit(functools.partial(losses.attention_weighted_feature_loss, standardize=True))
  _close(asdc(student, teacher), np.mean(attention * per_location))
  _close(asdc(student, 10 * teacher), np.mean(attention * per_location))


@pytest.mark.parametrize("shape", [(6,), (6, 2)])
@pytest.mark.parametrize("margin", [0.0, 0.5, 100.0])
def test_teacher_bounded_regression_matches_reference(shape, margin):
  rng = _rng(7)
  target = _normal(rng, *shape)
  student = target + _normal(rng, *shape)
  teacher = target + _normal(rng, *shape)
  fn = _jit(losses.teacher_bounded_regression, margin=margin)
  expected = np_teacher_bounded(student, teacher, target, margin)
  _close(fn(student, teacher, target), expected)


def test_teacher_bound_is_active_and_inactive_as_the_formula_says():
  target = np.zeros(2, np.float32)
  student = np.array([0.5, 2.0], np.float32)  # errors 0.25, 4
  teacher = np.array([1.0, 1.0], np.float32)  # errors 1, 1
  # m = 0: only the second sample (4 > 1) is penalised.
  _close(losses.teacher_bounded_regression(student, teacher, target), 2.0)
  # m = 1: 0.25 + 1 > 1 switches the first sample on too.
  _close(losses.teacher_bounded_regression(student, teacher, target,
                                           margin=1.0), (0.25 + 4.0) / 2)
  # m = -4: even 4 - 4 > 1 fails; nothing is penalised.
  _close(losses.teacher_bounded_regression(student, teacher, target,
                                           margin=-4.0), 0.0)


def test_teacher_bounded_gradient():
  rng = _rng(8)
  target = _normal(rng, 5, 2)
  student = target + _normal(rng, 5, 2)
  teacher = target + _normal(rng, 5, 2)
  grad_s, grad_t = jax.jit(jax.grad(losses.teacher_bounded_regression,
                                    argnums=(0, 1)))(student, teacher, target)
  _close(grad_t, np.zeros_like(teacher))
  active = ((student - target)**2).sum(-1) > ((teacher - target)**2).sum(-1)
  assert 0 < active.sum() < 5, "the draw should mix active and bounded samples"
  expected = 2 * (student - target) * active[:, None] / 5
  _close(grad_s, expected)


def test_ccc_matches_emonet_definition():
  rng = _rng(9)
  target = _normal(rng, 16, 2)
  pred = 0.6 * target + 0.2 + _normal(rng, 16, 2, scale=0.5)
  values = jax.jit(losses.ccc)(pred, target)
  expected = [np_ccc_emonet(target[:, d], pred[:, d]) for d in range(2)]
  _close(values, expected)
  _close(jax.jit(losses.ccc_loss)(pred, target),
         np.mean(1 - np.array(expected)))
  _close(losses.ccc(pred[:, 0], target[:, 0]), expected[0])


def test_ccc_of_identical_and_shifted_vectors():
  x = _normal(_rng(10), 32)
  _close(losses.ccc(x, x), 1.0, atol=1e-6)
  _close(losses.ccc_loss(x, x), 0.0, atol=1e-6)
  shifted = x + 0.7
  value = losses.ccc(shifted, x)
  assert value < 1.0
  # Lin (1989): a pure shift c gives 2 var / (2 var + c^2).
  variance = np.var(x.astype(np.float64))
  _close(value, 2 * variance / (2 * variance + 0.49))
  _close(value, np_ccc_emonet(x, shifted))


@pytest.mark.parametrize("temperature", [0.2, 1.0])
@pytest.mark.parametrize("batch,dim,queue_size", [(2, 8, 6), (4, 16, 32)])
def test_info_nce_matches_reference(temperature, batch, dim, queue_size):
  rng = _rng(dim)
  query, key = _normal(rng, batch, dim), _normal(rng, batch, dim)
  queue = _normal(rng, queue_size, dim)
  fn = _jit(losses.info_nce, temperature=temperature)
  _close(fn(query, key, queue), np_info_nce(query, key, queue, temperature))


def test_info_nce_near_zero_when_positive_dominates():
  rng = _rng(11)
  query = np.concatenate([_normal(rng, 2, 4), np.zeros((2, 4), np.float32)], 1)
  key = query * 3.0  # same direction after normalisation
  queue = np.concatenate([np.zeros((8, 4), np.float32), _normal(rng, 8, 4)], 1)
  loss = losses.info_nce(query, key, queue, temperature=0.05)
  # logits are 20 for the positive and 0 for every negative.
  _close(loss, np.log1p(8 * np.exp(-20.0)), atol=1e-7)
  assert loss < 1e-6


def test_info_nce_gradient_flows_only_to_the_query():
  rng = _rng(12)
  query, key, queue = _normal(rng, 2, 8), _normal(rng, 2, 8), _normal(rng, 6, 8)
  grads = jax.jit(jax.grad(_partial(losses.info_nce, temperature=0.2),
                           argnums=(0, 1, 2)))(query, key, queue)
  chex.assert_tree_all_finite(grads)
  assert np.abs(grads[0]).max() > 0
  _close(grads[1], np.zeros_like(key))
  _close(grads[2], np.zeros_like(queue))


def test_update_queue_is_fifo_with_wrap_around():
  rng = _rng(13)
  queue_size, batch, dim = 6, 2, 3
  queue = _normal(rng, queue_size, dim)
  expected_queue, expected_pointer = queue.copy(), 0
  pointer = jnp.zeros((), jnp.int32)
  update = jax.jit(losses.update_queue)
  for _ in range(5):  # 5 batches of 2 in a queue of 6: wraps once
    keys = _normal(rng, batch, dim)
    queue, pointer = update(queue, keys, pointer)
    expected_queue[expected_pointer:expected_pointer + batch] = keys
    expected_pointer = (expected_pointer + batch) % queue_size
    _close(queue, expected_queue)
    assert int(pointer) == expected_pointer
    assert pointer.dtype == jnp.int32
  with pytest.raises(ValueError, match="multiple of the key batch"):
    losses.update_queue(queue, _normal(rng, 4, dim), pointer)


@pytest.mark.parametrize("batch,dim", [(2, 8), (5, 16)])
def test_disco_embedding_matches_reference(batch, dim):
  rng = _rng(batch)
  student, teacher = _normal(rng, batch, dim), _normal(rng, batch, dim)
  _close(jax.jit(losses.disco_embedding)(student, teacher),
         np_disco(student, teacher))
  # Per sample, so stacking the batch twice leaves it unchanged.
  _close(losses.disco_embedding(np.concatenate([student] * 2),
                                np.concatenate([teacher] * 2)),
         np_disco(student, teacher))


@pytest.mark.parametrize("student_hw", [(4, 4), (8, 8)])
@pytest.mark.parametrize("separate_attention", [False, True])
def test_attention_weighted_feature_loss_matches_reference(student_hw,
                                                           separate_attention):
  rng = _rng(14)
  student = _normal(rng, 2, *student_hw, 3)
  teacher = _normal(rng, 2, 4, 4, 3)
  attention_source = _normal(rng, 2, 4, 4, 6) if separate_attention else None
  expected = np_attention_weighted(
      student, teacher,
      teacher if attention_source is None else attention_source)
  actual = jax.jit(losses.attention_weighted_feature_loss)(
      student, teacher, attention_source)
  _close(actual, expected)
  with pytest.raises(ValueError, match="attention source"):
    losses.attention_weighted_feature_loss(student, teacher,
                                           np.zeros((2, 3, 4, 6)))


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("student_hw", [(4, 4), (2, 2)])
def test_key_feature_guidance_matches_reference(fraction, student_hw):
  rng = _rng(15)
  student = _normal(rng, 2, *student_hw, 5)
  teacher = _normal(rng, 2, 4, 4, 5)
  fn = _jit(losses.key_feature_guidance, top_k_fraction=fraction)
  _close(fn(student, teacher), np_key_feature(student, teacher, fraction))


def test_key_feature_guidance_only_looks_at_salient_locations():
  rng = _rng(16)
  teacher = _normal(rng, 2, 4, 4, 3, scale=0.1)
  teacher[:, 1, 2] *= 100.0  # the single most active location
  student = teacher.copy()
  student[:, 0, 0] = -student[:, 0, 0]  # mismatch at a quiet location
  loss = losses.key_feature_guidance(student, teacher, top_k_fraction=1 / 16)
  _close(loss, 0.0, atol=1e-6)
  student[:, 1, 2] = -student[:, 1, 2]  # opposite direction: distance 4
  _close(losses.key_feature_guidance(student, teacher, top_k_fraction=1 / 16),
         4.0)


def test_all_gradients_finite_and_teacher_gradients_zero():
  rng = _rng(17)
  s_map, t_map = _normal(rng, 2, 4, 4, 3), _normal(rng, 2, 4, 4, 3)
  s_vec, t_vec = _normal(rng, 2, 7), _normal(rng, 2, 7)
  weights = np_softmax(_normal(rng, 2, 16)).reshape(2, 4, 4).astype(np.float32)
  feature_losses = {
      "fitnet_hint": losses.fitnet_hint,
      "attention_transfer": losses.attention_transfer,
      "spatially_weighted": lambda s, t: losses.spatially_weighted_feature_loss(
          s, t, weights),
      "attention_weighted": losses.attention_weighted_feature_loss,
      "key_feature": losses.key_feature_guidance,
  }
  vector_losses = {
      "hinton_kd": functools.partial(losses.hinton_kd, temperature=4.0),
      "disco": losses.disco_embedding,
      "ccc_loss": losses.ccc_loss,
  }
  cases = [(fn, s_map, t_map) for fn in feature_losses.values()]
  cases += [(fn, s_vec, t_vec) for fn in vector_losses.values()]
  for fn, student, teacher in cases:
    grad_s, grad_t = jax.jit(jax.grad(fn, argnums=(0, 1)))(student, teacher)
    chex.assert_tree_all_finite((grad_s, grad_t))
    assert np.abs(grad_s).max() > 0, fn
    if fn is not losses.ccc_loss:  # ccc is symmetric: both are predictions
      _close(grad_t, np.zeros_like(teacher))
  labels = np.array([1, 3], np.int32)
  grad = jax.jit(jax.grad(_partial(losses.cross_entropy,
                                   label_smoothing=0.1)))(s_vec, labels)
  chex.assert_tree_all_finite(grad)


def test_outputs_are_float32_scalars_for_bfloat16_inputs():
  rng = _rng(18)
  s_map = jnp.asarray(_normal(rng, 2, 4, 4, 3), jnp.bfloat16)
  t_map = jnp.asarray(_normal(rng, 2, 4, 4, 3), jnp.bfloat16)
  for fn in (losses.fitnet_hint, losses.attention_transfer,
             losses.attention_weighted_feature_loss,
             losses.key_feature_guidance):
    out = fn(s_map, t_map)
    assert out.shape == () and out.dtype == jnp.float32, fn
