"""Tests for the AFNet teacher (fer_jax/models/afnet.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fer_jax.models import afnet
from helpers import normal

BATCH, SIZE = 2, 48
FPN_DIM, EMBED_DIM, NUM_REGIONS, NUM_CLASSES = 8, 8, 4, 7
# A thin ResNet-18 with the 48 px stem: stage4 is 6x6x32.
BACKBONE_KWARGS = (("stem", "small"), ("width", 4))
STAGE_CHANNELS = (8, 16, 32)  # stage2..stage4
# The backbone's own classifier: built by the backbone, unused by AFNet.
BACKBONE_HEAD = ("backbone", "Heads_0")


def make(**overrides):
  fields = dict(num_classes=NUM_CLASSES, backbone="resnet18",
                backbone_kwargs=BACKBONE_KWARGS, fpn_dim=FPN_DIM,
                embed_dim=EMBED_DIM, num_regions=NUM_REGIONS)
  fields.update(overrides)
  return afnet.AFNet(**fields)


def init(model, images):
  # An 'rbg' key: parameter init then compiles far less than with threefry,
  # and compilation dominates the run time of these tiny models.
  return model.init(jax.random.key(1, impl="rbg"), images)


def shapes(tree):
  return {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_variables(model, size=SIZE, channels=1):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, size, size, channels)))


def abstract_params(model, size=SIZE, channels=1):
  return abstract_variables(model, size, channels)["params"]


def train_apply(model, variables, images, seed):
  (logits, aux), _ = model.apply(
      variables, images, train=True, rngs={"dropout": jax.random.key(seed)},
      mutable=["batch_stats"])
  return logits, aux


@pytest.fixture(scope="module")
def images():
  return normal(0, (BATCH, SIZE, SIZE, 1))


@pytest.fixture(scope="module")
def default(images):
  """The default AFNet (all branches on) with a V/A head, initialised once."""
  model = make(num_va=2)
  return model, init(model, images)


def test_output_shapes_and_aux(images, default):
  model, variables = default
  logits, aux = model.apply(variables, images)
  assert logits.shape == (BATCH, NUM_CLASSES)
  assert set(aux) == {
      "stem", "stage1", "stage2", "stage3", "stage4", "fpn_p3", "fpn_p4",
      "fpn_p5", "att_map", "region_weights", "embedding", "region_loss", "va"}
  for level, stage in zip(afnet.PYRAMID_NAMES, ("stage2", "stage3", "stage4")):
    assert aux[level].shape == aux[stage].shape[:3] + (FPN_DIM,)
  assert aux["stage4"].shape == (BATCH, 6, 6, STAGE_CHANNELS[-1])
  assert aux["att_map"].shape == (BATCH, 6, 6, NUM_REGIONS)
  att_map = np.asarray(aux["att_map"])
  assert np.all(att_map >= 0)
  np.testing.assert_allclose(att_map.sum(axis=(1, 2)), 1.0, rtol=1e-4)
  weights = np.asarray(aux["region_weights"])
  assert weights.shape == (BATCH, NUM_REGIONS)
  assert np.all((weights > 0) & (weights < 1))
  assert aux["embedding"].shape == (BATCH, 3 * EMBED_DIM)
  assert aux["region_loss"].shape == ()
  assert np.isfinite(aux["region_loss"])
  assert aux["va"].shape == (BATCH, 2)


def test_fpn_handles_odd_level_sizes():
  maps = [jax.ShapeDtypeStruct((BATCH, s, s, c), jnp.float32)
          for s, c in ((6, 3), (3, 5), (2, 7))]
  pyramid = afnet.FeaturePyramid(4)
  levels = jax.eval_shape(
      lambda m: pyramid.init_with_output(jax.random.key(0), m)[0], maps)
  assert [p.shape for p in levels] == [(BATCH, s, s, 4) for s in (6, 3, 2)]


@pytest.mark.parametrize("overrides, gone, embedding_dim", [
    (dict(use_fpn=False), "fpn", 3 * EMBED_DIM),
    (dict(num_regions=0), "regions", 2 * EMBED_DIM),
    (dict(channel_mask_keep=1.0), "masked_channels", 2 * EMBED_DIM),
    (dict(fusion="sum"), None, EMBED_DIM),
    (dict(fusion="attention"), None, EMBED_DIM),
])
def test_each_switch_changes_the_model(images, default, overrides, gone,
                                       embedding_dim):
  base, base_vars = default
  ablated = make(num_va=2, **overrides)
  ablated_vars = init(ablated, images)
  base_params, ablated_params = base_vars["params"], ablated_vars["params"]
  assert shapes(base_params) != shapes(ablated_params)
  # The backbone is untouched by every switch.
  assert (shapes(base_params["backbone"]) ==
          shapes(ablated_params["backbone"]))
  if gone:
    assert gone in base_params and gone not in ablated_params
  if overrides.get("fusion") == "attention":
    assert "score" in ablated_params["fusion"]
  base_logits, _ = base.apply(base_vars, images)
  logits, aux = ablated.apply(ablated_vars, images)
  assert aux["embedding"].shape == (BATCH, embedding_dim)
  assert not np.allclose(base_logits, logits)


def test_use_fpn_off_pools_the_last_map():
  params = abstract_params(make(use_fpn=False))
  kernel = params["fusion"]["project_global"]["kernel"]
  assert kernel.shape == (STAGE_CHANNELS[-1], EMBED_DIM)


def test_no_regions_drops_region_outputs(images):
  model = make(num_regions=0, use_fpn=False)
  _, aux = jax.eval_shape(
      lambda v: model.apply(v, images), abstract_variables(model))
  assert not {"att_map", "region_weights", "region_loss"} & set(aux)
  assert not {"fpn_p3", "fpn_p4", "fpn_p5"} & set(aux)


def test_fusion_modes_match_formulas():
  rng = np.random.RandomState(0)
  branches = {"global": rng.randn(BATCH, 6), "local": rng.randn(BATCH, 5),
              "masked": rng.randn(BATCH, 5)}
  for mode in afnet.FUSIONS:
    module = afnet.BranchFusion(mode, EMBED_DIM)
    variables = module.init(jax.random.key(0), branches, train=False)
    params = variables["params"]
    fused = module.apply(variables, branches, train=False)
    # Each projection is Dense -> BatchNorm (fresh running stats: mean 0,
    # var 1, so x / sqrt(1 + eps)) -> ReLU.
    projected = np.stack([
        np.maximum(branches[name] @ np.asarray(params[f"project_{name}"]["kernel"])
                   / np.sqrt(1.0 + 1e-5), 0.0) for name in branches
    ], axis=1)
    if mode == "concat":
      expected = projected.reshape(BATCH, -1)
    elif mode == "sum":
      expected = projected.sum(axis=1)
    else:
      scores = np.tanh(projected) @ np.asarray(params["score"]["kernel"])[:, 0]
      weights = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
      expected = np.einsum("bn,bnd->bd", weights, projected)
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)


def captured_regions(model, variables, images):
  """The model's aux and the output dict of its RegionAttention module."""
  (_, aux), state = model.apply(
      variables, images, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == "regions")
  return aux, state["intermediates"]["regions"]["__call__"][0]


def test_region_features_are_the_mu_weighted_mean(images, default):
  model, variables = default
  aux, regions = captured_regions(model, variables, images)
  mu = np.asarray(regions["region_weights"])
  features = np.asarray(regions["region_features"])
  expected = (mu[..., None] * features).sum(1) / mu.sum(1, keepdims=True)
  np.testing.assert_allclose(regions["feature"], expected, rtol=1e-5,
                             atol=1e-6)
  # mu_0 scores the pooled whole face with the regions' importance layer.
  importance = variables["params"]["regions"]["importance"]
  logit = (np.asarray(aux["stage4"]).mean(axis=(1, 2)) @
           np.asarray(importance["kernel"]) +
           np.asarray(importance["bias"]))[:, 0]
  np.testing.assert_allclose(regions["face_weight"], 1 / (1 + np.exp(-logit)),
                             rtol=1e-5)


def test_channel_mask_only_in_train_mode_and_driven_by_dropout_rng(images):
  masked, unmasked = (make(dropout_rate=0.0),
                      make(dropout_rate=0.0, channel_mask_keep=1.0))
  masked_vars, unmasked_vars = init(masked, images), init(unmasked, images)
  # Eval draws no mask: different 'dropout' streams give the same output.
  evaluated = [masked.apply(masked_vars, images, rngs={"dropout": jax.random.key(seed)})[0]
               for seed in (0, 1)]
  np.testing.assert_array_equal(*evaluated)
  # In train mode (classifier dropout off) only the channel mask draws from
  # the 'dropout' stream: the masked model depends on it, the unmasked not.
  first, second = (train_apply(masked, masked_vars, images, seed)[0]
                   for seed in (0, 1))
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(
      train_apply(masked, masked_vars, images, 0)[0], first)
  first, second = (train_apply(unmasked, unmasked_vars, images, seed)[0]
                   for seed in (0, 1))
  np.testing.assert_allclose(first, second, rtol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_channel_mask_is_per_sample_and_channel(images, train):
  keep = 0.5
  model = make(channel_mask_keep=keep)
  variables = init(model, images)
  (_, aux), state = model.apply(
      variables, images, train=train, rngs={"dropout": jax.random.key(3)},
      mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == "mask")
  masked = np.asarray(
      state["intermediates"]["masked_channels"]["mask"]["__call__"][0])
  last = np.asarray(aux["stage4"])
  if not train:
    np.testing.assert_array_equal(masked, last)
    return
  live = last > 0  # ReLU output: compare only where the map is non-zero.
  scale = np.where(live, masked / np.where(live, last, 1.0), np.nan)
  per_channel = np.nanmax(scale, axis=(1, 2))
  # One factor per (sample, channel), the same at every position...
  np.testing.assert_allclose(np.nanmin(scale, axis=(1, 2)), per_channel)
  # ...either dropped or rescaled by 1 / keep...
  factors = per_channel[~np.isnan(per_channel)]
  assert set(np.unique(np.round(factors, 5))) == {0.0, 1 / keep}
  # ...and drawn separately for each sample.
  assert not np.array_equal(per_channel[0] > 0, per_channel[1] > 0)


@pytest.mark.torch
def test_partition_loss_matches_dan_torch_code():
  torch = pytest.importorskip("torch")
  features = np.random.RandomState(0).randn(3, 4, 6).astype(np.float32)
  # yaoing/DAN PartitionLoss: log(1 + num_head / x.var(dim=1).mean()).
  heads = torch.from_numpy(features)
  expected = torch.log(1 + heads.size(1) / heads.var(dim=1).mean()).item()
  np.testing.assert_allclose(afnet.partition_loss(jnp.asarray(features)),
                             expected, rtol=1e-5)


def test_partition_loss_matches_numpy_formula():
  features = np.random.RandomState(1).randn(3, 4, 6)
  variance = features.var(axis=1, ddof=1).mean()
  np.testing.assert_allclose(afnet.partition_loss(jnp.asarray(features)),
                             np.log(1 + 4 / variance), rtol=1e-5)
  assert afnet.partition_loss(jnp.asarray(features[:, :1])) == 0
  # Heads that spread apart are penalised less.
  spread = np.concatenate([features[:, :1], features[:, :1] + 10], axis=1)
  assert (afnet.partition_loss(jnp.asarray(spread)) <
          afnet.partition_loss(jnp.asarray(features[:, :2])))


def test_region_biased_loss_matches_formula():
  region_weights = np.array([[0.2, 0.9, 0.5], [0.3, 0.4, 0.35],
                             [0.6, 0.1, 0.61]], np.float32)
  face_weight = np.array([0.5, 0.39, 0.7], np.float32)
  # max(0, 0.02 - (mu_max - mu_0)) per sample: 0, 0.01, 0.11.
  np.testing.assert_allclose(
      afnet.region_biased_loss(jnp.asarray(region_weights),
                               jnp.asarray(face_weight), 0.02),
      np.mean([0.0, 0.01, 0.11]), rtol=1e-5)


def test_model_region_biased_loss_uses_whole_face_weight(images, default):
  model, variables = default
  model = model.clone(region_loss="region_biased", region_margin=0.5)
  aux, regions = captured_regions(model, variables, images)
  lead = (np.asarray(aux["region_weights"]).max(axis=1) -
          np.asarray(regions["face_weight"]))
  np.testing.assert_allclose(aux["region_loss"],
                             np.mean(np.maximum(0.0, 0.5 - lead)), rtol=1e-5)


def test_model_partition_loss_is_on_log_softmax_over_heads(images, default):
  model, variables = default
  aux, regions = captured_regions(model, variables, images)
  features = np.asarray(regions["region_features"], np.float64)
  log_probs = features - np.log(np.exp(features).sum(axis=1, keepdims=True))
  variance = log_probs.var(axis=1, ddof=1).mean()
  np.testing.assert_allclose(aux["region_loss"],
                             np.log(1 + NUM_REGIONS / variance), rtol=1e-4)


def test_region_loss_none_is_absent(images, default):
  model, variables = default
  _, aux = model.clone(region_loss="none").apply(variables, images)
  assert "region_loss" not in aux and "region_weights" in aux


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(fusion="attention", region_loss="region_biased", region_margin=1.0),
])
def test_total_loss_gradient_reaches_every_parameter(images, default,
                                                     overrides):
  model, variables = default
  if overrides:
    model = model.clone(**overrides)
    variables = init(model, images)
  labels = jnp.array([1, 3])

  @jax.jit
  def total_loss_grad(params):

    def total_loss(params):
      (logits, aux), _ = model.apply(
          {**variables, "params": params}, images, train=True,
          rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      loss += sum(v for k, v in aux.items() if k.endswith("_loss"))
      return loss + jnp.mean(aux["va"]**2)

    return jax.grad(total_loss)(params)

  grads = total_loss_grad(variables["params"])
  dead = [
      jax.tree_util.keystr(path)
      for path, g in jax.tree_util.tree_leaves_with_path(grads)
      if not np.any(np.asarray(g)) and tuple(
          k.key for k in path[:len(BACKBONE_HEAD)]) != BACKBONE_HEAD
  ]
  assert not dead


def test_backbone_kwargs_accept_pairs_and_mappings():
  pairs = abstract_params(make(backbone_kwargs=(("stem", "small"),
                                                ("width", 2))))
  # Configs hand the kwargs over as a (possibly frozen) ConfigDict.
  config = ml_collections.FrozenConfigDict({"stem": "small", "width": 2})
  assert shapes(pairs) == shapes(abstract_params(make(backbone_kwargs=config)))
  assert shapes(pairs) != shapes(abstract_params(make()))
  assert pairs["backbone"]["stem"]["conv"]["kernel"].shape == (3, 3, 1, 2)


def added_parameters(stage_channels, fpn_dim, embed_dim, num_regions,
                     num_classes):
  """Parameters AFNet adds to its backbone, counted from the design."""

  def bn(channels):  # BatchNorm's scale and bias.
    return 2 * channels

  c, f, e = stage_channels[-1], fpn_dim, embed_dim
  fpn = sum(ch * f + f for ch in stage_channels) + 3 * (9 * f * f + f)
  spatial = c * (c // 2) + bn(c // 2) + (c // 2) * c * (9 + 3 + 3) + 3 * bn(c)
  channel = c * (c // 16) + bn(c // 16) + (c // 16) * c + c
  regions = num_regions * (spatial + channel) + c + 1
  masked = c * c + bn(c)
  # Each branch: a bias-free projection then BatchNorm (scale and bias).
  fusion = (3 * f * e + bn(e)) + 2 * (c * e + bn(e))
  classifier = 3 * e * num_classes + num_classes
  return fpn + regions + masked + fusion + classifier


def parameter_counts(model, size, channels):
  params = dict(abstract_params(model, size, channels))
  backbone = params.pop("backbone")
  return (sum(x.size for x in jax.tree.leaves(backbone)),
          sum(x.size for x in jax.tree.leaves(params)))


def test_added_parameter_count_matches_design():
  _, added = parameter_counts(make(), SIZE, 1)
  assert added == added_parameters(STAGE_CHANNELS, FPN_DIM, EMBED_DIM,
                                   NUM_REGIONS, NUM_CLASSES)


def test_full_size_parameter_count():
  model = afnet.AFNet(num_classes=NUM_CLASSES)
  backbone, added = parameter_counts(model, 224, 3)
  # torchvision ResNet-18: 11,689,512 with its 1000-way fc (513,000); here
  # the backbone carries its own (unused) 7-way classifier instead.
  assert backbone == 11_689_512 - 513_000 + 512 * NUM_CLASSES + NUM_CLASSES
  assert added == added_parameters((128, 256, 512), model.fpn_dim,
                                   model.embed_dim, model.num_regions,
                                   NUM_CLASSES)


@pytest.mark.parametrize("field, value", [
    ("fusion", "max"), ("region_loss", "focal"), ("num_regions", -1),
    ("channel_mask_keep", 0.0), ("pyramid_stages", ("stage3", "stage4")),
])
def test_bad_fields_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"AFNet.{field}"):
    make(**{field: value})


def test_missing_backbone_stage_is_reported():
  with pytest.raises(ValueError, match="stage5"):
    abstract_params(make(pyramid_stages=("stage2", "stage3", "stage5")))
