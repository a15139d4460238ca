"""Mobile students (MobileNetV2, EfficientFormer, MobileFaceNet) and DepthwiseConv.

References:
  * the grouped lax convolution, for the shifted depthwise conv;
  * published parameter and MAC counts at 224 px (traced, not run);
  * the hand-written PyTorch twins (experiments/benchmarks/torch_twins.py),
    with the Flax weights copied in, for the forward pass;
  * torchvision's mobilenet_v2 and timm's efficientformer_l1/l3, with their
    weights copied into the twins. These tests skip where the libraries are
    absent, as in the project venv. They passed with timm 1.0.29 and
    torchvision 0.26.
"""
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mkd
from fer_jax import models
from fer_jax.models import efficientformer
from fer_jax.models import layers
from fer_jax.models import mobilenet_v2
from fer_jax.tools.count import count
from helpers import normal

TWINS_PATH = (pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
              / "torch_twins.py")


def random_variables(model: nn.Module, x_shape: tuple[int, ...], seed: int = 0) -> dict:
  """Variables of ``model`` with every leaf random (numpy; no compiled init).

  Every leaf moves away from its init (LayerScale 1e-5, zero attention biases,
  unit BatchNorm statistics), so each one affects the output.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x_shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "scale":
      return (1 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
    return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# --- DepthwiseConv -------------------------------------------------------------

DEPTHWISE_CASES = [
    # (input HxW, kernel, strides, padding)
    ((7, 9), 3, 1, "SAME"),
    ((7, 9), 3, 2, "SAME"),
    ((8, 11), 5, 2, 2),
    ((9, 6), 3, 2, ((1, 1), (0, 2))),
    ((5, 5), 5, 1, "VALID"),
    ((6, 7), (3, 1), (1, 2), "SAME"),
]


@pytest.mark.parametrize("spatial,kernel_size,strides,padding", DEPTHWISE_CASES)
def test_depthwise_shifted_equals_native_forward_and_gradient(spatial, kernel_size, strides,
                                                              padding):
  x = normal(0, (2, *spatial, 5))
  conv = {impl: layers.DepthwiseConv(kernel_size, strides, padding, impl=impl)
          for impl in ("native", "shifted")}
  shapes = {impl: jax.eval_shape(conv[impl].init, jax.random.key(1), x) for impl in conv}
  assert jax.tree.map(jnp.shape, shapes["shifted"]) == jax.tree.map(jnp.shape, shapes["native"])
  variables = random_variables(conv["native"], x.shape)
  target = normal(2, jax.eval_shape(conv["native"].apply, variables, x).shape)

  @jax.jit
  def outputs_and_grads(v, inputs):
    results = {}
    for impl, module in conv.items():
      loss = lambda v, inputs, module=module: jnp.sum(module.apply(v, inputs) * target)
      results[impl] = (module.apply(v, inputs), jax.grad(loss, argnums=(0, 1))(v, inputs))
    return results

  results = outputs_and_grads(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               results["shifted"], results["native"])


def test_depthwise_kernel_layout_matches_nn_conv():
  """A grouped nn.Conv checkpoint (kernel [k, k, 1, C], bias [C]) loads as is."""
  x = normal(0, (2, 9, 9, 4))
  grouped = nn.Conv(4, (3, 3), 2, ((1, 1), (1, 1)), feature_group_count=4)
  variables = random_variables(grouped, x.shape)
  expected = jax.jit(grouped.apply)(variables, x)
  for impl in ("native", "shifted"):
    ours = jax.jit(layers.DepthwiseConv(3, 2, 1, impl=impl).apply)(variables, x)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def _grouped_conv_count(fn, *args) -> int:
  jaxpr = jax.make_jaxpr(fn)(*args)
  return sum(1 for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"
             and eqn.params["feature_group_count"] > 1)


def test_auto_is_shifted_on_cpu_and_force_switch_overrides():
  assert jax.default_backend() == "cpu"
  x = jnp.ones((1, 6, 6, 3))
  conv = layers.DepthwiseConv(3, impl="auto")
  variables = conv.init(jax.random.key(0), x)
  assert layers.resolve_depthwise_impl("auto") == "shifted"
  assert _grouped_conv_count(conv.apply, variables, x) == 0
  with layers.force_layer_forms("native"):
    assert layers.resolve_depthwise_impl("shifted") == "native"
    assert _grouped_conv_count(conv.apply, variables, x) == 1
  assert _grouped_conv_count(conv.apply, variables, x) == 0


@pytest.mark.parametrize("bad", [
    dict(impl="grouped"), dict(padding="FULL"), dict(kernel_size=(3, 3, 3))])
def test_depthwise_rejects_bad_fields_by_name(bad):
  field = next(iter(bad))
  with pytest.raises(ValueError, match=f"DepthwiseConv.{field}"):
    layers.DepthwiseConv(**bad).init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
  with pytest.raises(ValueError, match="force_layer_forms"):
    with layers.force_layer_forms("auto"):
      pass


# --- Architecture details --------------------------------------------------------


def test_make_divisible_matches_reference_rounding():
  # torchvision's _make_divisible: 32*0.35 = 11.2 rounds to 8 (< 90 %), so 16.
  assert [mobilenet_v2.make_divisible(v) for v in (11.2, 16 * 0.5, 24 * 0.75, 1280, 5.6)] == [
      16, 8, 24, 1280, 8]


def test_relative_position_index_against_enumeration():
  height, width = 2, 3
  index = efficientformer.relative_position_index(height, width)
  coords = [(y, x) for y in range(height) for x in range(width)]
  expected = [[abs(p[0] - q[0]) * width + abs(p[1] - q[1]) for q in coords] for p in coords]
  np.testing.assert_array_equal(index, expected)


# --- Shapes and aux keys -----------------------------------------------------------

# (name, fields, input HxWxC) -> spatial size of stem, stage1.., and embedding width.
SHAPE_CASES = [
    ("mobilenet_v2", dict(stem="small"), (48, 48, 1), [48, 48, 48, 24, 12, 6], 1280),
    ("mobilenet_v2", {}, (112, 112, 3), [56, 56, 28, 14, 7, 4], 1280),
    ("mobilenet_v2", dict(width=0.5), (224, 224, 3), [112, 112, 56, 28, 14, 7], 1280),
    ("efficientformer_l1", dict(stem="small"), (48, 48, 1), [48, 48, 24, 12, 6], 448),
    ("efficientformer_l1", {}, (48, 48, 1), [12, 12, 6, 3, 2], 448),
    ("efficientformer_l1", {}, (112, 112, 3), [28, 28, 14, 7, 4], 448),
    ("efficientformer_l3", dict(stem="small"), (48, 48, 1), [48, 48, 24, 12, 6], 512),
    ("efficientformer_l3", {}, (224, 224, 3), [56, 56, 28, 14, 7], 512),
    ("mobilefacenet", {}, (48, 48, 1), [24, 12, 6, 3], 128),
    ("mobilefacenet", {}, (112, 112, 3), [56, 28, 14, 7], 128),
]


@pytest.mark.parametrize("name,fields,input_shape,sizes,embedding_dim", SHAPE_CASES)
def test_output_and_aux_shapes(name, fields, input_shape, sizes, embedding_dim):
  model = models.build(name, num_classes=7, num_va=2, **fields)
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  stages = [f"stage{i}" for i in range(1, len(sizes))]
  assert set(aux) == {"stem", *stages, "embedding", "va"}
  assert logits.shape == (2, 7)
  assert aux["va"].shape == (2, 2)
  assert aux["embedding"].shape == (2, embedding_dim)
  for key, size in zip(["stem", *stages], sizes):
    assert aux[key].shape[:3] == (2, size, size), key
  without_va = models.build(name, num_classes=7, **fields)
  _, aux = jax.eval_shape(without_va.apply, jax.eval_shape(without_va.init, jax.random.key(0), x), x)
  assert "va" not in aux


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientformer_l1"])
def test_unknown_stem_is_rejected_by_field_name(name):
  model = models.build(name, num_classes=7, stem="tiny")
  with pytest.raises(ValueError, match=r"\.stem must be one of"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 48, 48, 1), jnp.float32))


# --- Published sizes (traced at 224 px, never run) ------------------------------------

# name -> (published params, published MACs, params the published figure adds)
PUBLISHED = {
    # Sandler et al. 2018 / torchvision: 3.50 M, 300 M MACs.
    "mobilenet_v2": (3.5e6, 0.30e9, 0),
    # timm cards; the reference also builds a distillation head of D*1000+1000.
    "efficientformer_l1": (12.3e6, 1.3e9, 448 * 1000 + 1000),
    "efficientformer_l3": (31.4e6, 3.9e9, 512 * 1000 + 1000),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_macs_match_published_at_224(name):
  params, macs, extra_params = PUBLISHED[name]
  counted = count(name, (224, 224, 3), num_classes=1000)
  assert counted["params"] + extra_params == pytest.approx(params, rel=0.03)
  assert counted["macs"] == pytest.approx(macs, rel=0.03)


def test_mobilefacenet_matches_paper_at_112():
  """Chen et al. 2018: 0.99 M parameters and 221 M MACs up to the embedding."""
  with_head = count("mobilefacenet", (112, 112, 3), num_classes=1)
  classifier = 128 + 1
  assert with_head["params"] - classifier == pytest.approx(0.99e6, rel=0.03)
  assert with_head["macs"] - 128 == pytest.approx(221e6, rel=0.03)


def test_mobilenet_v2_exact_reference_parameter_count():
  """torchvision's mobilenet_v2() has exactly 3,504,872 parameters."""
  assert count("mobilenet_v2", (224, 224, 3))["params"] == 3_504_872


# --- Running the models ----------------------------------------------------------


@pytest.mark.slow  # compiling a full backward pass on XLA:CPU takes 20-50 s
@pytest.mark.parametrize("name,fields,input_shape", [
    ("mobilenet_v2", dict(width=0.35, stem="small"), (24, 24, 1)),
    ("efficientformer_l1", dict(stem="small"), (24, 24, 1)),
    ("mobilefacenet", {}, (32, 32, 3)),
])
def test_train_step_updates_batch_stats_and_reaches_every_parameter(name, fields, input_shape):
  model = models.build(name, num_classes=7, num_va=2, **fields)
  x = normal(0, (2, *input_shape))
  variables = random_variables(model, x.shape)

  def loss(params):
    (logits, aux), updates = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(1)})
    return jnp.sum(logits**2) + jnp.sum(aux["va"]**2), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not dead
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


@pytest.fixture(scope="module")
def torch_twins():
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location("torch_twins", TWINS_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# (name, Flax fields, twin fields, input HxWxC)
TWIN_CASES = [
    ("mobilenet_v2", dict(width=0.35, stem="small"), dict(width=0.35, stem="small"), (40, 40, 1)),
    ("efficientformer_l1", dict(stem="small"), dict(stem="small"), (24, 24, 1)),
    ("mobilefacenet", {}, {}, (48, 48, 3)),
    # The CPU tier's student and teacher (configs/mkd.py), the twins of train_vs_torch.py.
    ("vgg_fer", mkd.CPU_STUDENT, mkd.CPU_STUDENT, (48, 48, 1)),
    ("afnet", mkd.CPU_TEACHER, mkd.CPU_TEACHER, (48, 48, 1)),
]


@pytest.mark.torch
@pytest.mark.parametrize("name,fields,twin_fields,input_shape", TWIN_CASES)
def test_forward_matches_pytorch_twin(torch_twins, name, fields, twin_fields, input_shape):
  import torch  # pylint: disable=import-outside-toplevel
  model = models.build(name, num_classes=7, **fields)
  x = np.random.default_rng(1).normal(size=(2, *input_shape)).astype(np.float32)
  variables = random_variables(model, x.shape)
  logits, _ = jax.jit(model.apply)(variables, x)
  twin = torch_twins.TWINS[name](7, input_shape[-1], input_size=input_shape[0],
                                 **twin_fields).eval()
  torch_twins.load_flax_variables(twin, variables)
  with torch.no_grad():
    expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.std(expected) > 0.1  # randomised weights give a non-trivial function
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# (twin name, reference constructor, reference keys without a twin counterpart)
REFERENCE_CASES = [
    ("mobilenet_v2", "torchvision.models:mobilenet_v2", ()),
    ("efficientformer_l1", "timm:efficientformer_l1", ("head_dist", "attention_bias_idxs")),
    ("efficientformer_l3", "timm:efficientformer_l3", ("head_dist", "attention_bias_idxs")),
]


@pytest.mark.torch
@pytest.mark.parametrize("name,reference,skip", REFERENCE_CASES)
def test_pytorch_twin_matches_published_implementation(torch_twins, name, reference, skip):
  """torchvision / timm at 224 px with random weights; skipped where they are absent.

  The twins equal the Flax models (test_forward_matches_pytorch_twin), so
  this ties the Flax models to the published code. Not in the torch_reference extra:
  the registry's torchvision 0.28.0 wheel (the default build, not the +cpu one) does
  not load its compiled operators beside torch 2.13.0+cpu ("operator torchvision::nms
  does not exist" at import, checked 2026-12-05), and timm needs torchvision. Run it
  where a CPU build of torchvision matches torch: ``pip install torchvision timm
  --index-url https://download.pytorch.org/whl/cpu``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  module_name, constructor = reference.split(":")
  library = pytest.importorskip(module_name, reason=f"{module_name} is not installed "
                                "(see this test's docstring)")
  torch.manual_seed(0)
  ref = getattr(library, constructor)() if module_name != "timm" else library.create_model(
      constructor)
  # Move norm statistics, LayerScales and attention biases off their inits
  # (kernels keep theirs, so activations stay finite through the depth).
  state = ref.state_dict()
  for key, value in state.items():
    if key.endswith("running_var"):
      state[key] = value + torch.rand_like(value)
    elif value.is_floating_point() and (value.ndim == 1 or "attention_biases" in key):
      state[key] = value + 0.1 * torch.randn_like(value)
  if "head_dist.weight" in state:  # eval output is the mean of both heads
    state["head_dist.weight"], state["head_dist.bias"] = state["head.weight"], state["head.bias"]
  ref.load_state_dict(state)
  twin = torch_twins.TWINS[name](1000, 3, input_size=224)
  torch_twins.load_reference_state_dict(twin, state, skip)
  x = torch.randn(2, 3, 224, 224)
  with torch.no_grad():
    expected, actual = ref.eval()(x), twin.eval()(x)
  assert torch.isfinite(expected).all() and expected.std() > 0.01
  torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
