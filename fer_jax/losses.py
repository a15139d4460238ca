"""Training losses and distillation distances, each a pure, jit-able function.

Every function takes batched arrays, computes in float32 (so bfloat16
activations do not lose the small differences distillation terms measure) and,
unless its docstring says otherwise, returns a float32 scalar averaged over the
batch. Each docstring names the paper or reference code whose convention it
follows and the reduction used.

Teacher inputs are wrapped in ``jax.lax.stop_gradient``: every distillation
setup in fer_jax keeps the teacher frozen (methods.md §4), and stopping the
gradient here means a trainer cannot leak updates into it by accident.

Feature maps are NHWC. Feature distances between a student and a teacher map
require equal channel counts (apply the trainer's 1x1 adapter first); when the
spatial sizes differ, the student map is bilinearly resized to the teacher's
(``jax.image.resize`` with half-pixel centres and no antialiasing, i.e. the
convention of PyTorch ``F.interpolate(mode='bilinear', align_corners=False)``
that PyTorch distillation code uses). That resize is our choice: FitNets,
MKD and ASDC-FER do not say how they align maps of different resolution.

References:
  Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
  Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015.
  Zagoruyko, Komodakis. Paying More Attention to Attention. ICLR 2017.
  Chen, Choi, Yu, Han, Chandraker. Learning Efficient Object Detection Models
    with Knowledge Distillation. NeurIPS 2017.
  Toisoul et al. Estimation of continuous valence and arousal levels from
    faces in naturalistic conditions (EmoNet). Nature Machine Intelligence 2021.
  Chen, Fan, Girshick, He. Improved Baselines with Momentum Contrastive
    Learning (MoCo v2). 2020.
  Gao et al. DisCo: Remedy Self-supervised Learning on Lightweight Models with
    Distilled Contrastive Learning. ECCV 2022.
  Chen, Li, Tian, Wei, Seberi. Lightweight expression recognition combined
    attention fusion network with hybrid knowledge distillation (AFNet/MKD).
    Neurocomputing 628, 2025.
  Yan, Yang, Wang. ASDC-FER: attention-guided self-supervised distilled
    contrastive learning for facial expression recognition. JEI 33(5), 2024.
"""
import jax
import jax.numpy as jnp
import optax

# torch.nn.functional.normalize's default eps: the norm is clamped from below
# so an all-zero row (e.g. a dead ReLU map) normalises to zeros, not NaN.
_NORMALIZE_EPS = 1e-12


def _as_float32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _NORMALIZE_EPS)


def _check_rank(fn_name: str, arg_name: str, x: jax.Array, rank: int,
                layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{fn_name}: {arg_name} must be {layout} (rank {rank}), "
                     f"got shape {x.shape}")


def _resize_spatial(feature: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinearly resizes an NHWC map or a [B, H, W] map to (height, width)."""
  if feature.shape[1:3] == (height, width):
    return feature
  shape = (feature.shape[0], height, width) + feature.shape[3:]
  return jax.image.resize(feature, shape, method="bilinear", antialias=False)


def _aligned_feature_pair(fn_name: str, student_feature: jax.Array,
                          teacher_feature: jax.Array, standardize: bool = False):
  """Checks an NHWC pair; returns both in float32, the student resized.

  ``standardize``: both maps through ``standardize_channels`` after the resize.
  """
  _check_rank(fn_name, "student_feature", student_feature, 4, "NHWC")
  _check_rank(fn_name, "teacher_feature", teacher_feature, 4, "NHWC")
  if student_feature.shape[0] != teacher_feature.shape[0]:
    raise ValueError(f"{fn_name}: batch sizes differ, student_feature "
                     f"{student_feature.shape} vs teacher_feature "
                     f"{teacher_feature.shape}")
  if student_feature.shape[-1] != teacher_feature.shape[-1]:
    raise ValueError(
        f"{fn_name}: student_feature has {student_feature.shape[-1]} channels "
        f"but teacher_feature has {teacher_feature.shape[-1]}; map the student "
        "to the teacher's width with a 1x1 adapter first")
  teacher = jax.lax.stop_gradient(_as_float32(teacher_feature))
  student = _resize_spatial(_as_float32(student_feature), *teacher.shape[1:3])
  if standardize:
    return standardize_channels(student), standardize_channels(teacher)
  return student, teacher


def _channel_mean_squared_error(student: jax.Array,
                                teacher: jax.Array) -> jax.Array:
  """mean_c (s - t)^2 at every location: [B, H, W, C] x 2 -> [B, H, W]."""
  return jnp.mean(jnp.square(student - teacher), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  label_smoothing: float = 0.0,
                  num_classes: int | None = None) -> jax.Array:
  """Softmax cross-entropy, batch mean.

  Args:
    logits: [B, K].
    labels: int class indices [B], or a distribution over classes [B, K]
      (e.g. FERPlus vote frequencies or mixup targets).
    label_smoothing: alpha of Szegedy et al. 2016; the target becomes
      (1 - alpha) * target + alpha / K, for index and soft labels alike.
    num_classes: K, checked against ``logits.shape[-1]`` when given so that a
      config/model mismatch fails loudly.

  Index labels outside [0, K) cannot be checked under jit: they give NaN
  without smoothing and a silently wrong loss with it, so datasets must map
  their labels into the model's order.

  Returns:
    float32 scalar, mean over the batch of -sum_k target_k log softmax_k.
  """
  logits = _as_float32(logits)
  _check_rank("cross_entropy", "logits", logits, 2, "[B, K]")
  k = logits.shape[-1]
  if num_classes is not None and num_classes != k:
    raise ValueError(f"cross_entropy: num_classes={num_classes} but logits "
                     f"have {k} classes (shape {logits.shape})")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got "
                     f"{label_smoothing}")
  if labels.ndim == 1:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"cross_entropy: [B] labels must be integer class "
                       f"indices, got dtype {labels.dtype}")
    if label_smoothing == 0.0:
      return jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    targets = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  elif labels.shape == logits.shape:
    targets = _as_float32(labels)
  else:
    raise ValueError(f"cross_entropy: labels must be [B] indices or a [B, {k}] "
                     f"distribution, got shape {labels.shape} for logits "
                     f"{logits.shape}")
  if label_smoothing > 0.0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def hinton_kd(student_logits: jax.Array, teacher_logits: jax.Array, *,
              temperature: float) -> jax.Array:
  """Hinton et al. 2015 logit distillation: T^2 KL(p_t^T || p_s^T), batch mean.

  p^T = softmax(z / T). The T^2 factor keeps the gradient scale comparable
  with the hard-label term as T changes (Hinton et al. §2). Reduction follows
  the attention-transfer reference code
  ``kl_div(log_softmax(y/T), softmax(t/T), size_average=False) * T**2 / B``:
  sum over classes, mean over the batch.
  """
  if temperature <= 0:
    raise ValueError(f"hinton_kd: temperature must be > 0, got {temperature}")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"hinton_kd: student_logits {student_logits.shape} and "
                     f"teacher_logits {teacher_logits.shape} must match")
  teacher_logits = jax.lax.stop_gradient(_as_float32(teacher_logits))
  log_p_student = jax.nn.log_softmax(_as_float32(student_logits) / temperature)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature)
  kl = optax.losses.kl_divergence_with_log_targets(log_p_student, log_p_teacher)
  return temperature**2 * jnp.mean(kl)


def fitnet_hint(student_feature: jax.Array, teacher_feature: jax.Array, *,
                standardize: bool = False) -> jax.Array:
  """FitNets hint loss (Romero et al. 2015) between adapted student and teacher.

  The student map must already be through the trainer's 1x1 regressor (same
  channel count as the teacher); a different spatial size is bilinearly
  resized to the teacher's (module docstring). ``standardize`` compares
  ``standardize_channels`` of both maps (PKD) instead of the raw activations.

  Returns:
    float32 scalar, mean over all B*H*W*C elements of (s - t)^2. FitNets
    writes 1/2 ||s - t||^2; that differs only by the constant factor
    2/(B*H*W*C) and is absorbed by the loss weight.
  """
  student, teacher = _aligned_feature_pair("fitnet_hint", student_feature,
                                           teacher_feature, standardize)
  return jnp.mean(jnp.square(student - teacher))


def _spatial_energy(feature: jax.Array, p: float) -> jax.Array:
  """mean_c |x|^p per location: [B, H, W, C] -> [B, H, W]."""
  return jnp.mean(jnp.abs(_as_float32(feature))**p, axis=-1)


def attention_map(feature: jax.Array, p: float = 2) -> jax.Array:
  """Zagoruyko & Komodakis activation-based spatial attention.

  Reference code: ``F.normalize(x.pow(p).mean(1).view(B, -1))``; we take |x|^p
  so odd p is also an energy (identical for even p and for post-ReLU maps).

  Args:
    feature: NHWC map [B, H, W, C].
    p: exponent of the activation energy.

  Returns:
    [B, H*W] float32, row-major over (H, W), each row of unit L2 norm.
  """
  _check_rank("attention_map", "feature", feature, 4, "NHWC")
  energy = _spatial_energy(feature, p)
  return _l2_normalize(energy.reshape(energy.shape[0], -1))


def attention_transfer(student_feature: jax.Array, teacher_feature: jax.Array,
                       p: float = 2) -> jax.Array:
  """Attention transfer loss (Zagoruyko & Komodakis ICLR 2017).

  ``(at(x_s) - at(x_t)).pow(2).mean()`` as in the reference code: mean over
  batch and locations of the squared difference of the two attention maps
  (the paper's beta/2 factor belongs to the loss weight). Channel counts may
  differ. If the spatial sizes differ (the paper only pairs equal-size
  stages), the per-location energy maps mean_c |x|^p are bilinearly upsampled
  to the larger of the two sizes before the L2 normalisation; upsampling the
  one-channel energy map rather than the feature keeps this cheap. That
  alignment is our reconstruction.

  Returns:
    float32 scalar.
  """
  for name, x in (("student_feature", student_feature),
                  ("teacher_feature", teacher_feature)):
    _check_rank("attention_transfer", name, x, 4, "NHWC")
  if student_feature.shape[0] != teacher_feature.shape[0]:
    raise ValueError(f"attention_transfer: batch sizes differ, student_feature "
                     f"{student_feature.shape} vs teacher_feature "
                     f"{teacher_feature.shape}")
  height = max(student_feature.shape[1], teacher_feature.shape[1])
  width = max(student_feature.shape[2], teacher_feature.shape[2])
  teacher_feature = jax.lax.stop_gradient(teacher_feature)
  maps = []
  for feature in (student_feature, teacher_feature):
    energy = _resize_spatial(_spatial_energy(feature, p), height, width)
    maps.append(_l2_normalize(energy.reshape(energy.shape[0], -1)))
  return jnp.mean(jnp.square(maps[0] - maps[1]))


def standardize_channels(feature: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Each channel of an NHWC map to zero mean and unit std over batch and positions.

  The normalisation of PKD (Cao et al., "PKD: General Distillation Framework
  for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022;
  mmrazor ``PKDLoss.norm``): ``(x - mean_c) / (std_c + eps)`` with the
  unbiased std, statistics over (B, H, W) of the global batch. The MSE between
  two standardised channels is about ``2 * (1 - r)``, r their Pearson
  correlation, so it ignores the teacher's activation scale, which a raw MSE
  inherits.
  """
  _check_rank("standardize_channels", "feature", feature, 4, "NHWC")
  feature = _as_float32(feature)
  mean = jnp.mean(feature, axis=(0, 1, 2), keepdims=True)
  std = jnp.std(feature, axis=(0, 1, 2), keepdims=True, ddof=1)
  return (feature - mean) / (std + eps)


def spatially_weighted_feature_loss(student_feature: jax.Array,
                                    teacher_feature: jax.Array,
                                    weight_map: jax.Array, *,
                                    standardize: bool = False) -> jax.Array:
  """MKD feature loss weighted by a spatial-attention map (reconstruction).

  Seed (a) says only that in its multi-layer KD "a spatial attention network
  focuses on the important knowledge"; we read that as: the attention decides
  where the student must match the teacher (methods.md §1(a), [INFERRED]).

    loss = sum_{b,h,w} w[b,h,w] * mean_c (s - t)^2  /  sum_{b,h,w} w[b,h,w]

  i.e. a weighted mean of the per-location channel-mean squared error, so a
  softmax over locations and an unnormalised non-negative map give the same
  scale. Gradients flow into ``weight_map``; a weight network trained by this
  loss alone would learn to look where the student already agrees, so train
  it through the task or teacher instead (or stop its gradient here).

  Args:
    student_feature: adapted student map [B, h, w, C] (resized if h, w differ).
    teacher_feature: [B, H, W, C].
    weight_map: non-negative [B, H, W], at the teacher's resolution.
    standardize: compare ``standardize_channels`` of both maps (after the
      resize), as PKD does, instead of the raw activations.

  Returns:
    float32 scalar.
  """
  student, teacher = _aligned_feature_pair("spatially_weighted_feature_loss",
                                           student_feature, teacher_feature, standardize)
  if weight_map.shape != teacher.shape[:3]:
    raise ValueError(f"spatially_weighted_feature_loss: weight_map must be "
                     f"[B, H, W] = {teacher.shape[:3]} (the teacher's grid), "
                     f"got {weight_map.shape}")
  weight_map = _as_float32(weight_map)
  per_location = _channel_mean_squared_error(student, teacher)
  return jnp.sum(weight_map * per_location) / jnp.maximum(
      jnp.sum(weight_map), _NORMALIZE_EPS)


def teacher_bounded_regression(student_pred: jax.Array, teacher_pred: jax.Array,
                               target: jax.Array, *,
                               margin: float = 0.0) -> jax.Array:
  """Teacher-bounded regression loss L_b (Chen et al. NeurIPS 2017, eq. 3).

  Per sample, L_b = ||s - y||^2 if ||s - y||^2 + m > ||t - y||^2 else 0: the
  student is only pushed towards the target while it is not at least m better
  than the teacher. The teacher enters only through the gate and is under
  stop_gradient.

  Args:
    student_pred, teacher_pred, target: [B] or [B, D] (e.g. D = 2 for
      valence/arousal; the squared norm sums over D).
    margin: m.

  Returns:
    float32 scalar, mean over the batch of L_b (samples with L_b = 0 count).
  """
  if not student_pred.shape == teacher_pred.shape == target.shape:
    raise ValueError(f"teacher_bounded_regression: student_pred "
                     f"{student_pred.shape}, teacher_pred {teacher_pred.shape} "
                     f"and target {target.shape} must have one shape")
  if student_pred.ndim not in (1, 2):
    raise ValueError(f"teacher_bounded_regression: inputs must be [B] or "
                     f"[B, D], got shape {student_pred.shape}")
  target = _as_float32(target)
  teacher_pred = jax.lax.stop_gradient(_as_float32(teacher_pred))
  student_error = jnp.square(_as_float32(student_pred) - target)
  teacher_error = jnp.square(teacher_pred - target)
  if student_error.ndim == 2:
    student_error = jnp.sum(student_error, axis=-1)
    teacher_error = jnp.sum(teacher_error, axis=-1)
  bounded = jnp.where(student_error + margin > teacher_error, student_error, 0.)
  return jnp.mean(bounded)


def ccc(pred: jax.Array, target: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Concordance correlation coefficient, per output column.

  EmoNet's metrics.py: ``2 * pcc * std_p * std_g / (std_p**2 + std_g**2 +
  (mean_p - mean_g)**2)`` with population (ddof=0) statistics; since
  pcc * std_p * std_g is the population covariance we compute it directly.
  It is a statistic over the batch, not a per-sample mean: on a sharded
  global batch jit computes it over the whole batch.

  Args:
    pred, target: [N] or [N, D].
    eps: added to the denominator so constant columns give 0, not NaN.

  Returns:
    float32 scalar for [N] inputs, [D] for [N, D].
  """
  if pred.shape != target.shape or pred.ndim not in (1, 2):
    raise ValueError(f"ccc: pred {pred.shape} and target {target.shape} must "
                     "have one shape, [N] or [N, D]")
  pred, target = _as_float32(pred), _as_float32(target)
  pred_mean, target_mean = jnp.mean(pred, axis=0), jnp.mean(target, axis=0)
  covariance = jnp.mean((pred - pred_mean) * (target - target_mean), axis=0)
  denominator = (jnp.var(pred, axis=0) + jnp.var(target, axis=0) +
                 jnp.square(pred_mean - target_mean))
  return 2.0 * covariance / (denominator + eps)


def ccc_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """1 - CCC per output column (ccc above), averaged over columns.

  Returns:
    float32 scalar in [0, 2].
  """
  return jnp.mean(1.0 - ccc(pred, target))


def info_nce(query: jax.Array, positive_key: jax.Array, queue: jax.Array, *,
             temperature: float) -> jax.Array:
  """MoCo v2 InfoNCE loss with a queue of negatives.

  q, k+ and the queue rows are L2-normalised here (idempotent for keys
  already normalised by the encoder head), logits are
  [q . k+, q . queue^T] / T of shape [B, 1 + K], and the loss is the
  cross-entropy with the positive at index 0, as in MoCo's builder.py. The
  positive key (momentum encoder) and the queue are under stop_gradient.

  Args:
    query: [B, D] from the query encoder.
    positive_key: [B, D] from the momentum encoder, same images.
    queue: [K, D] keys of earlier batches.
    temperature: T (0.2 in MoCo v2).

  Returns:
    float32 scalar, batch mean.
  """
  if temperature <= 0:
    raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
  _check_rank("info_nce", "query", query, 2, "[B, D]")
  if positive_key.shape != query.shape:
    raise ValueError(f"info_nce: positive_key {positive_key.shape} must match "
                     f"query {query.shape}")
  if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
    raise ValueError(f"info_nce: queue must be [K, {query.shape[1]}], got "
                     f"{queue.shape}")
  query = _l2_normalize(_as_float32(query))
  positive_key = jax.lax.stop_gradient(_l2_normalize(_as_float32(positive_key)))
  queue = jax.lax.stop_gradient(_l2_normalize(_as_float32(queue)))
  positive_logits = jnp.sum(query * positive_key, axis=-1, keepdims=True)
  negative_logits = query @ queue.T
  logits = jnp.concatenate([positive_logits, negative_logits], axis=-1)
  labels = jnp.zeros(query.shape[0], jnp.int32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits / temperature, labels))


def update_queue(queue: jax.Array, keys: jax.Array,
                 pointer: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MoCo FIFO update: writes ``keys`` over the oldest B rows of the queue.

  As in MoCo's ``_dequeue_and_enqueue``, K must be a multiple of B and the
  pointer (an int scalar, start 0) always a multiple of B, so a write never
  straddles the end; the pointer wraps to 0 after K / B updates. The pointer
  cannot be checked under jit. Keys are stored under stop_gradient in the
  queue's dtype.

  Args:
    queue: [K, D].
    keys: [B, D] (the momentum encoder's keys of this batch).
    pointer: int scalar, the row where this batch is written.

  Returns:
    (new_queue [K, D], new_pointer = (pointer + B) % K, same dtype).
  """
  if queue.ndim != 2 or keys.ndim != 2 or keys.shape[1] != queue.shape[1]:
    raise ValueError(f"update_queue: queue must be [K, D] and keys [B, D] with "
                     f"one D, got queue {queue.shape} and keys {keys.shape}")
  queue_size, batch_size = queue.shape[0], keys.shape[0]
  if queue_size % batch_size:
    raise ValueError(f"update_queue: queue size K={queue_size} must be a "
                     f"multiple of the key batch B={batch_size}")
  pointer = jnp.asarray(pointer)
  keys = jax.lax.stop_gradient(keys).astype(queue.dtype)
  new_queue = jax.lax.dynamic_update_slice(
      queue, keys, (pointer, jnp.zeros_like(pointer)))
  new_pointer = (pointer + batch_size) % queue_size
  return new_queue, new_pointer.astype(pointer.dtype)


def disco_embedding(student_embedding: jax.Array,
                    teacher_embedding: jax.Array) -> jax.Array:
  """DisCo embedding distillation (Gao et al. ECCV 2022).

  DisCo's code applies ``MSELoss(reduction='sum')`` to the L2-normalised
  student and teacher embeddings, i.e. the sum over the batch of
  ||q_s - q_t||^2. We divide by B and report the per-sample value so the
  loss weight does not depend on the batch size; multiply by B to recover
  DisCo's number. Each term equals 2 - 2 cos(q_s, q_t), in [0, 4].

  Args:
    student_embedding, teacher_embedding: [B, D] (projection-head outputs).

  Returns:
    float32 scalar, batch mean of the squared distance of unit vectors.
  """
  if student_embedding.shape != teacher_embedding.shape:
    raise ValueError(f"disco_embedding: student_embedding "
                     f"{student_embedding.shape} and teacher_embedding "
                     f"{teacher_embedding.shape} must match")
  _check_rank("disco_embedding", "student_embedding", student_embedding, 2,
              "[B, D]")
  student = _l2_normalize(_as_float32(student_embedding))
  teacher = jax.lax.stop_gradient(
      _l2_normalize(_as_float32(teacher_embedding)))
  return jnp.sum(jnp.square(student - teacher)) / student.shape[0]


def _teacher_spatial_attention(fn_name: str, feature: jax.Array,
                               grid: tuple[int, ...]) -> jax.Array:
  """The teacher's attention_map as [B, H, W], checked against ``grid``."""
  if feature.shape[:3] != grid:
    raise ValueError(f"{fn_name}: the attention source must be "
                     f"[B, H, W, *] with [B, H, W] = {grid} (the teacher's "
                     f"grid), got shape {feature.shape}")
  return jax.lax.stop_gradient(attention_map(feature).reshape(grid))


def attention_weighted_feature_loss(
    student_feature: jax.Array, teacher_feature: jax.Array,
    teacher_feature_for_attention: jax.Array | None = None, *,
    standardize: bool = False) -> jax.Array:
  """ASDC-FER attention-weighted joint feature distillation (reconstruction).

  Seed (c) guides the student "with joint attention-weighted features"; only
  its abstract is public, so this is our reading (methods.md §1(c),
  [INFERRED]): A_t, the teacher's spatial attention (attention_map with p=2,
  shaped [B, H, W] and scaled to mean 1 over each sample's locations so the
  loss keeps the scale of a plain MSE), weights the per-location channel-mean
  squared error:

    loss = mean_{b,h,w} A_t[b,h,w] * mean_c (s - t)^2

  Args:
    student_feature: adapted student map [B, h, w, C] (resized if h, w differ).
    teacher_feature: [B, H, W, C], the distillation target.
    teacher_feature_for_attention: optional teacher map [B, H, W, C'] to take
      A_t from (e.g. a pre-projection map); defaults to ``teacher_feature``.
    standardize: the squared error of ``standardize_channels`` of both maps
      (PKD, as MKD's standardised variant); A_t still comes from the raw map.

  Returns:
    float32 scalar.
  """
  fn_name = "attention_weighted_feature_loss"
  student, teacher = _aligned_feature_pair(fn_name, student_feature,
                                           teacher_feature, standardize)
  source = (teacher_feature if teacher_feature_for_attention is None else
            teacher_feature_for_attention)
  attention = _teacher_spatial_attention(fn_name, source, teacher.shape[:3])
  attention = attention / jnp.maximum(
      jnp.mean(attention, axis=(1, 2), keepdims=True), _NORMALIZE_EPS)
  return jnp.mean(attention * _channel_mean_squared_error(student, teacher))


def _gather_locations(feature: jax.Array, locations: jax.Array) -> jax.Array:
  """Channel vectors at flat row-major locations [B, k]: -> [B, k, C]."""
  batch, _, _, channels = feature.shape
  return jnp.take_along_axis(
      feature.reshape(batch, -1, channels), locations[..., None], axis=1)


def key_feature_guidance(student_feature: jax.Array, teacher_feature: jax.Array,
                         *, top_k_fraction: float = 0.25) -> jax.Array:
  """ASDC-FER "facial key-feature guidance" (reconstruction).

  Seed (c) says the student "focuses on key features extracted from the
  teacher"; our reading (methods.md §1(c), [INFERRED]): per sample, take the
  k = max(1, round(top_k_fraction * H * W)) locations where the teacher's
  attention_map (p=2) is largest and match the student's channel vector to
  the teacher's there, both L2-normalised over channels. The distance per
  location is the squared Euclidean distance of the unit vectors
  (= 2 - 2 cos, so it does not shrink with the channel count C; an
  element-wise mean would be this divided by C). Ties are broken towards the
  lower row-major index (``jax.lax.top_k``).

  Args:
    student_feature: adapted student map [B, h, w, C] (resized if h, w differ).
    teacher_feature: [B, H, W, C].
    top_k_fraction: share of locations in (0, 1] treated as key features.

  Returns:
    float32 scalar, mean over the batch and the k selected locations.
  """
  if not 0.0 < top_k_fraction <= 1.0:
    raise ValueError(f"key_feature_guidance: top_k_fraction must be in (0, 1], "
                     f"got {top_k_fraction}")
  fn_name = "key_feature_guidance"
  student, teacher = _aligned_feature_pair(fn_name, student_feature,
                                           teacher_feature)
  batch, height, width, _ = teacher.shape
  attention = _teacher_spatial_attention(fn_name, teacher,
                                         (batch, height, width))
  k = max(1, round(top_k_fraction * height * width))
  _, locations = jax.lax.top_k(attention.reshape(batch, -1), k)
  student_keys = _l2_normalize(_gather_locations(student, locations))
  teacher_keys = _l2_normalize(_gather_locations(teacher, locations))
  return jnp.mean(jnp.sum(jnp.square(student_keys - teacher_keys), axis=-1))
