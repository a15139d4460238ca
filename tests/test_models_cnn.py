"""Tests of the CNN families: ResNet, IR-50, the FER2013 VGG and mini-Xception.

Shapes are checked at full size by tracing only (jax.eval_shape); anything that
runs uses thin widths and a batch of 2. The PyTorch tests rebuild each network
from its published layout with torch.nn.functional, load our weights, and
compare outputs, which pins padding, stride placement, shortcut and flatten
order (what a weight port depends on).
"""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import models
from fer_jax.models import layers, resnet
from helpers import normal

NUM_CLASSES = 7
NUM_VA = 2
KEY = jax.random.key(2)


def _abstract_forward(name, input_shape, **kwargs):
  model = models.build(name, num_classes=NUM_CLASSES, num_va=NUM_VA, **kwargs)
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)


def _resnet_maps(size, stem, channels):
  """Expected (side, channels) of stem and stages for a He ResNet."""
  side = size if stem == "small" else math.ceil(math.ceil(size / 2) / 2)
  maps = {"stem": (side, 64)}
  for i, c in enumerate(channels):
    if i:
      side = math.ceil(side / 2)
    maps[f"stage{i + 1}"] = (side, c)
  return maps


def _halving_maps(first_side, channels, prefix_stem=None):
  maps = {} if prefix_stem is None else {"stem": prefix_stem}
  side = first_side
  for i, c in enumerate(channels):
    maps[f"stage{i + 1}"] = (side, c)
    side = math.ceil(side / 2)
  return maps


BASIC = (64, 128, 256, 512)
BOTTLENECK = (256, 512, 1024, 2048)

# (model, input HxWxC, constructor kwargs, expected aux maps, embedding dim)
SHAPE_CASES = [
    ("resnet18", (48, 48, 1), {"stem": "small"},
     _resnet_maps(48, "small", BASIC), 512),
    ("resnet18", (112, 112, 3), {}, _resnet_maps(112, "imagenet", BASIC), 512),
    ("resnet34", (48, 48, 1), {"stem": "small"},
     _resnet_maps(48, "small", BASIC), 512),
    ("resnet34", (112, 112, 3), {}, _resnet_maps(112, "imagenet", BASIC), 512),
    ("resnet50", (48, 48, 1), {"stem": "small"},
     _resnet_maps(48, "small", BOTTLENECK), 2048),
    ("resnet50", (112, 112, 3), {},
     _resnet_maps(112, "imagenet", BOTTLENECK), 2048),
    ("ir50", (48, 48, 1), {}, _halving_maps(24, BASIC, (48, 64)), 512),
    ("ir50", (112, 112, 3), {}, _halving_maps(56, BASIC, (112, 64)), 512),
    ("vgg_fer", (48, 48, 1), {}, _halving_maps(24, BASIC), 4096),
    ("vgg_fer", (112, 112, 3), {}, _halving_maps(56, BASIC), 4096),
    ("mini_xception", (48, 48, 1), {},
     _halving_maps(22, (16, 32, 64, 128), (44, 8)), 128),
    ("mini_xception", (112, 112, 3), {},
     _halving_maps(54, (16, 32, 64, 128), (108, 8)), 128),
]


@pytest.mark.parametrize(
    "name,input_shape,kwargs,maps,embedding_dim", SHAPE_CASES,
    ids=[f"{c[0]}-{c[1][0]}px" for c in SHAPE_CASES])
def test_output_and_aux_shapes(name, input_shape, kwargs, maps, embedding_dim):
  logits, aux = _abstract_forward(name, input_shape, **kwargs)
  assert logits.shape == (2, NUM_CLASSES)
  expected = {k: (2, side, side, c) for k, (side, c) in maps.items()}
  expected.update(embedding=(2, embedding_dim), va=(2, NUM_VA))
  if name == "mini_xception":
    expected["l2_loss"] = ()
  assert {k: v.shape for k, v in aux.items()} == expected


def test_resnet_rejects_unknown_stem():
  with pytest.raises(ValueError, match="stem"):
    _abstract_forward("resnet18", (48, 48, 1), stem="cifar")


THIN_MODELS = {
    "resnet18": lambda: models.build("resnet18", num_classes=NUM_CLASSES,
                                     num_va=NUM_VA, stem="small", width=4),
    "resnet50": lambda: models.build("resnet50", num_classes=NUM_CLASSES,
                                     num_va=NUM_VA, stem="small", width=2),
    "ir": lambda: resnet.IResNet(num_classes=NUM_CLASSES, num_va=NUM_VA,
                                 stage_sizes=(1, 2, 1, 1), width=4),
    "vgg_fer": lambda: models.build("vgg_fer", num_classes=NUM_CLASSES,
                                    num_va=NUM_VA, width=4, fc_width=16),
    "mini_xception": lambda: models.build("mini_xception",
                                          num_classes=NUM_CLASSES,
                                          num_va=NUM_VA),
}


def _random_variables(model, x, seed=0):
  """Variables shaped like ``model.init``'s, filled by numpy.

  Running Flax's initialisers compiles a threefry program per parameter, which
  costs seconds on CPU; the tests only need well-scaled random values. BN
  statistics, scales and PReLU slopes are drawn away from their init values so
  that a swapped or misplaced one changes the output.
  """
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    shape, name = leaf.shape, path[-1].key
    if name == "kernel":
      values = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
    elif name in ("var", "scale"):
      values = rng.uniform(0.5, 1.5, shape)
    elif name == "slope":
      values = rng.uniform(0.0, 0.5, shape)
    else:
      values = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(values, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _image(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


@pytest.mark.parametrize("family", sorted(THIN_MODELS))
def test_train_mode_updates_batch_stats(family):
  model = THIN_MODELS[family]()
  x = _image((2, 48, 48, 1))
  variables = _random_variables(model, x)
  (logits, aux), updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, rngs={"dropout": KEY},
                               mutable=["batch_stats"]))(variables, x)
  chex.assert_tree_all_finite((logits, aux, updates))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                       variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(moved))


def test_iresnet_gradients_reach_every_parameter():
  model = THIN_MODELS["ir"]()
  x = _image((2, 48, 48, 1))
  variables = _random_variables(model, x)

  def loss(params):
    (logits, aux), _ = model.apply(
        {**variables, "params": params}, x, train=True,
        rngs={"dropout": KEY}, mutable=["batch_stats"])
    return jnp.mean(logits ** 2) + jnp.mean(aux["va"] ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  chex.assert_tree_all_finite(grads)
  assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("family", ["ir", "vgg_fer"])
def test_dropout_acts_only_in_training(family):
  model = THIN_MODELS[family]()
  x = _image((2, 48, 48, 1))
  variables = _random_variables(model, x)

  @functools.partial(jax.jit, static_argnums=0)
  def run(train, key):
    return model.apply(variables, x, train=train, rngs={"dropout": key},
                       mutable=["batch_stats"])[0][0]

  key_a, key_b = jax.random.key(3), jax.random.key(4)
  np.testing.assert_array_equal(run(False, key_a), run(False, key_b))
  assert not np.allclose(run(True, key_a), run(True, key_b))


def test_vgg_fc_input_is_2048_at_published_crop_size():
  model = models.build("vgg_fer", num_classes=NUM_CLASSES)
  x = jax.ShapeDtypeStruct((1, 40, 40, 1), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  shapes = {name: params["params"][name]["kernel"].shape
            for name in ("fc1", "fc2")}
  assert shapes == {"fc1": (2048, 4096), "fc2": (4096, 4096)}


def test_mini_xception_depthwise_impls_agree_and_l2_loss_is_stem_only():
  x = _image((2, 48, 48, 1))
  native = models.build("mini_xception", num_classes=NUM_CLASSES,
                        depthwise_impl="native")
  shifted = models.build("mini_xception", num_classes=NUM_CLASSES,
                         depthwise_impl="shifted")
  variables = _random_variables(native, x)
  native_logits, aux = jax.jit(native.apply)(variables, x)
  shifted_logits, _ = jax.jit(shifted.apply)(variables, x)
  np.testing.assert_allclose(native_logits, shifted_logits, atol=1e-5)
  params = variables["params"]
  stem_sq = sum(float(jnp.sum(params[f"stem_conv{i}"]["kernel"] ** 2))
                for i in (1, 2))
  np.testing.assert_allclose(aux["l2_loss"], 0.01 * stem_sq, rtol=1e-5)


# --------------------------------------------------------------------------
# PyTorch references.


class _Torch:
  """Functional PyTorch ops reading our (NHWC-layout) weights."""

  def __init__(self, variables, bn_eps=1e-5):
    self.torch = pytest.importorskip("torch")
    self.F = self.torch.nn.functional
    self.params = variables["params"]
    self.stats = variables.get("batch_stats", {})
    self.eps = bn_eps

  def t(self, a):
    return self.torch.from_numpy(np.array(a, np.float32))

  def nchw(self, x):
    return self.t(x).permute(0, 3, 1, 2)

  def get(self, tree, path):
    for key in path.split("/"):
      tree = tree[key]
    return tree

  def conv(self, x, path, stride=1, padding=None, groups=1):
    p = self.get(self.params, path)
    kernel = self.t(p["kernel"]).permute(3, 2, 0, 1)
    bias = self.t(p["bias"]) if "bias" in p else None
    if padding is None:
      padding = kernel.shape[-1] // 2
    return self.F.conv2d(x, kernel, bias, stride, padding, groups=groups)

  def bn(self, x, path):
    p, s = self.get(self.params, path), self.get(self.stats, path)
    return self.F.batch_norm(x, self.t(s["mean"]), self.t(s["var"]),
                             self.t(p["scale"]), self.t(p["bias"]), False, 0.0,
                             self.eps)

  def conv_bn(self, x, path, stride=1):
    return self.bn(self.conv(x, f"{path}/conv", stride), f"{path}/bn")

  def prelu(self, x, path):
    return self.F.prelu(x, self.t(self.get(self.params, path)["slope"]))

  def linear(self, x, path):
    p = self.get(self.params, path)
    return self.F.linear(x, self.t(p["kernel"]).T, self.t(p["bias"]))

  def heads(self, embedding):
    return (self.linear(embedding, "Heads_0/classifier"),
            self.linear(embedding, "Heads_0/va_head"))


def _torch_resnet(ref, x, stage_sizes, bottleneck):
  relu = ref.F.relu
  y = relu(ref.conv_bn(x, "stem", 2))
  y = ref.F.max_pool2d(y, 3, 2, 1)
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      unit = f"stage{i + 1}_unit{j + 1}"
      stride = 2 if i and not j else 1
      if bottleneck:
        r = relu(ref.conv_bn(y, f"{unit}/conv1"))
        r = relu(ref.conv_bn(r, f"{unit}/conv2", stride))
        r = ref.conv_bn(r, f"{unit}/conv3")
      else:
        r = relu(ref.conv_bn(y, f"{unit}/conv1", stride))
        r = ref.conv_bn(r, f"{unit}/conv2")
      # torchvision: a projection where the stride or the channels change, i.e. in each
      # stage's first unit but the basic-block stage 1's.
      has_projection = j == 0 and (i > 0 or bottleneck)
      assert ("shortcut" in ref.params[unit]) == has_projection, unit
      shortcut = ref.conv_bn(y, f"{unit}/shortcut", stride) if has_projection else y
      y = relu(r + shortcut)
  return ref.heads(y.mean(dim=(2, 3)))


def _assert_close(ours, theirs):
  for a, b in zip(ours, theirs, strict=True):
    b = b.numpy()
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4,
                               atol=1e-4 * np.abs(b).max())


@pytest.mark.torch
@pytest.mark.parametrize("name,bottleneck", [("resnet18", False),
                                             ("resnet50", True)])
def test_resnet_matches_torch_reference(name, bottleneck):
  model = models.build(name, num_classes=NUM_CLASSES, num_va=NUM_VA, width=4)
  x = _image((2, 32, 32, 3))
  variables = _random_variables(model, x)
  logits, aux = jax.jit(model.apply)(variables, x)
  ref = _Torch(variables)
  stage_sizes = (2, 2, 2, 2) if name == "resnet18" else (3, 4, 6, 3)
  _assert_close((logits, aux["va"]),
                _torch_resnet(ref, ref.nchw(x), stage_sizes, bottleneck))


@pytest.mark.torch
@pytest.mark.parametrize("mid_bn", [False, True])
def test_iresnet_matches_torch_reference(mid_bn):
  stage_sizes = (2, 1, 1, 1)
  model = resnet.IResNet(num_classes=NUM_CLASSES, num_va=NUM_VA,
                         stage_sizes=stage_sizes, width=4, mid_bn=mid_bn)
  x = _image((2, 32, 32, 3))
  variables = _random_variables(model, x)
  logits, aux = jax.jit(model.apply)(variables, x)
  ref = _Torch(variables)
  y = ref.prelu(ref.conv_bn(ref.nchw(x), "stem"), "stem_prelu")
  channels = model.width
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      unit = f"stage{i + 1}_unit{j + 1}"
      stride = 2 if j == 0 else 1
      # face.evoLVe's bottleneck_IR: a projection only where the channels change.
      projected, channels = channels != model.width * 2**i, model.width * 2**i
      assert ("shortcut" in ref.params[unit]) == projected, unit
      r = ref.bn(y, f"{unit}/bn_in")
      r = (ref.conv_bn(r, f"{unit}/conv1") if mid_bn
           else ref.conv(r, f"{unit}/conv1"))
      r = ref.conv_bn(ref.prelu(r, f"{unit}/prelu"), f"{unit}/conv2", stride)
      if projected:
        shortcut = ref.conv_bn(y, f"{unit}/shortcut", stride)
      else:
        shortcut = ref.F.max_pool2d(y, 1, stride)
      y = r + shortcut
  y = ref.bn(y, "output_bn2d").flatten(1)
  embedding = ref.F.batch_norm(
      ref.linear(y, "output_fc"),
      ref.t(ref.stats["output_bn1d"]["mean"]),
      ref.t(ref.stats["output_bn1d"]["var"]),
      ref.t(ref.params["output_bn1d"]["scale"]),
      ref.t(ref.params["output_bn1d"]["bias"]), False, 0.0, 1e-5)
  _assert_close((aux["embedding"], logits, aux["va"]),
                (embedding, *ref.heads(embedding)))


@pytest.mark.torch
def test_vgg_matches_torch_reference():
  model = models.build("vgg_fer", num_classes=NUM_CLASSES, num_va=NUM_VA,
                       width=4, fc_width=16)
  x = _image((2, 40, 40, 1))
  variables = _random_variables(model, x)
  logits, aux = jax.jit(model.apply)(variables, x)
  ref = _Torch(variables)
  y = ref.nchw(x)
  for i in range(4):
    for j in range(2):
      y = ref.F.relu(ref.conv_bn(y, f"stage{i + 1}_conv{j + 1}"))
    y = ref.F.max_pool2d(y, 2, 2)
  h = y.flatten(1)
  for k in (1, 2):
    h = ref.F.relu(ref.linear(h, f"fc{k}"))
  _assert_close((logits, aux["va"]), ref.heads(h))


@pytest.mark.torch
def test_mini_xception_matches_keras_layout_in_torch():
  model = models.build("mini_xception", num_classes=NUM_CLASSES, num_va=NUM_VA)
  x = _image((2, 48, 48, 1))
  variables = _random_variables(model, x)
  logits, aux = jax.jit(model.apply)(variables, x)
  ref = _Torch(variables, bn_eps=1e-3)
  F = ref.F

  def same_max_pool(y):
    # TF 'SAME' for a 3x3/2 window: the odd padding goes bottom/right.
    pads = []
    for size in (y.shape[3], y.shape[2]):
      total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
      pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(y, pads, value=-math.inf), 3, 2)

  def separable(y, path):
    y = ref.conv(y, f"{path}/depthwise", groups=y.shape[1])
    return ref.conv(y, f"{path}/pointwise")

  y = ref.nchw(x)
  for i in (1, 2):
    y = F.relu(ref.bn(ref.conv(y, f"stem_conv{i}", padding=0),
                      f"stem_bn{i}"))
  for i in range(1, 5):
    s = f"stage{i}"
    residual = ref.bn(ref.conv(y, f"{s}_shortcut_conv", 2, padding=0),
                      f"{s}_shortcut_bn")
    r = F.relu(ref.bn(separable(y, f"{s}_sep1"), f"{s}_bn1"))
    r = ref.bn(separable(r, f"{s}_sep2"), f"{s}_bn2")
    y = same_max_pool(r) + residual
  torch_logits = ref.conv(y, "classifier").mean(dim=(2, 3))
  torch_va = ref.linear(y.mean(dim=(2, 3)), "va_head")
  _assert_close((logits, aux["va"]), (torch_logits, torch_va))


# --- The CPU form of dense convolutions ------------------------------------------


def _numpy_kernel_grad(x, grad_out, kernel_size):
  """dL/dW[i, j, c, f] = sum over images and output pixels of x_pad * dL/dy."""
  (kh, kw), (height, width) = kernel_size, grad_out.shape[1:3]
  x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))).astype(np.float64)
  return np.stack([np.stack([
      np.einsum("nhwc,nhwf->cf", x[:, i:i + height, j:j + width], grad_out)
      for j in range(kw)]) for i in range(kh)])


@pytest.mark.parametrize("batch,kernel_size,chunk_bytes,chunk", [
    (6, (3, 3), layers.PATCH_CHUNK_BYTES, 2),  # the largest power of two dividing 6
    (5, (3, 3), 1, 1),                         # odd batch: one image a chunk
    (8, (5, 5), 4 * 14 * 14 * 25 * 3 * 2, 2),  # 5x5 (14x14 padded): four chunks of two
    (6, (1, 1), 4 * 10 * 10 * 3 * 2, 2),       # 1x1: the patches are the input
    (4, (1, 3), layers.PATCH_CHUNK_BYTES, 4),  # AFNet's wide and tall kernels
    (4, (3, 1), 1, 1),
])
def test_patch_grad_conv_equals_lax_in_value_and_gradients(monkeypatch, batch, kernel_size,
                                                           chunk_bytes, chunk):
  monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", chunk_bytes)
  padded = (batch, 10 + kernel_size[0] - 1, 10 + kernel_size[1] - 1, 3)
  assert layers._batch_chunk(padded, kernel_size, 4) == chunk  # pylint: disable=protected-access
  x = normal(0, (batch, 10, 10, 3))
  kernel = normal(1, (*kernel_size, 3, 4))
  weights = normal(2, (batch, 10, 10, 4))
  padding = tuple((k // 2, k // 2) for k in kernel_size)
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patch_conv = lambda x, w: layers.patch_grad_conv(x, w, padding)
  loss = lambda conv: lambda x, w: jnp.sum(conv(x, w) * weights)
  np.testing.assert_allclose(patch_conv(x, kernel), lax_conv(x, kernel), rtol=1e-5, atol=1e-5)
  ours = jax.jit(jax.grad(loss(patch_conv), argnums=(0, 1)))(x, kernel)
  reference = jax.grad(loss(lax_conv), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(ours[0], reference[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      ours[1], _numpy_kernel_grad(np.asarray(x), np.asarray(weights), kernel_size),
      rtol=1e-4, atol=1e-3)


def _custom_vjp_count(fn, *args) -> int:
  return sum(1 for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns
             if eqn.primitive.name.startswith("custom_vjp"))


def test_conv_takes_the_patch_form_on_cpu_only_where_it_applies_and_force_overrides():
  x = jnp.ones((2, 8, 8, 3))
  same = layers.Conv(4, 3)
  strided = layers.Conv(4, 3, strides=2)
  variables = same.init(KEY, x)
  chex.assert_trees_all_equal_shapes(variables, nn.Conv(4, (3, 3)).init(KEY, x))
  assert layers.resolve_conv_impl("auto") == "patch_grad"
  assert _custom_vjp_count(same.apply, variables, x) == 1
  assert _custom_vjp_count(strided.apply, variables, x) == 0
  # 1x1 and rectangular kernels take it too, and compute what nn.Conv does.
  for kernel_size, pair in ((1, (1, 1)), ((1, 3), (1, 3))):
    conv, reference = layers.Conv(4, kernel_size), nn.Conv(4, pair)
    conv_variables = conv.init(KEY, x)
    chex.assert_trees_all_equal_shapes(conv_variables, reference.init(KEY, x))
    np.testing.assert_allclose(conv.apply(conv_variables, x),
                               reference.apply(conv_variables, x), rtol=1e-5, atol=1e-5)
    assert _custom_vjp_count(conv.apply, conv_variables, x) == 1
  assert _custom_vjp_count(layers.Conv(4, 3, padding=0).apply, variables, x) == 0
  assert _custom_vjp_count(layers.Conv(4, 3, impl="native").apply, variables, x) == 0
  with layers.force_layer_forms("native"):
    assert _custom_vjp_count(same.apply, variables, x) == 0
  with layers.force_layer_forms("cpu"):
    assert _custom_vjp_count(layers.Conv(4, 3, impl="native").apply, variables, x) == 1
  with pytest.raises(ValueError, match="Conv.impl"):
    layers.Conv(4, 3, impl="im2col").init(KEY, x)


@pytest.mark.slow  # 2 compiles of the whole net, 35 s; each form's unit test runs by default
def test_vgg_gradients_are_the_same_in_both_conv_forms():
  model = models.build("vgg_fer", num_classes=NUM_CLASSES, width=4, fc_width=0)
  x = normal(0, (4, 48, 48, 1))
  variables = model.init(KEY, x)

  def grads():
    loss = lambda params: jnp.sum(model.apply({**variables, "params": params}, x)[0] ** 2)
    return jax.jit(jax.grad(loss))(variables["params"])

  with layers.force_layer_forms("cpu"):
    cpu_form = grads()
  with layers.force_layer_forms("native"):
    lax_form = grads()
  chex.assert_trees_all_close(cpu_form, lax_form, rtol=1e-4, atol=1e-5)


def test_max_pool2_cpu_form_equals_lax_pooling_in_value_and_gradient():
  # Odd sides: the trailing row and column are dropped in both forms.
  x = normal(0, (2, 9, 7, 3))
  weights = normal(3, (2, 4, 3, 3))
  loss = lambda x: jnp.sum(layers.max_pool2(x) * weights)
  with layers.force_layer_forms("cpu"):
    cpu_value, cpu_grad = jax.value_and_grad(loss)(x)
    assert "select_and_scatter_add" not in str(jax.make_jaxpr(jax.grad(loss))(x))
  with layers.force_layer_forms("native"):
    lax_value, lax_grad = jax.value_and_grad(loss)(x)
  np.testing.assert_allclose(cpu_value, lax_value, rtol=1e-6)
  np.testing.assert_allclose(cpu_grad, lax_grad, rtol=1e-6)
  np.testing.assert_array_equal(  # the window maxima, by numpy
      layers.max_pool2(x), np.asarray(x)[:, :8, :6].reshape(2, 4, 2, 3, 2, 3).max(axis=(2, 4)))
