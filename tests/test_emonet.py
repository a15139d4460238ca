"""Tests for EmoNet (fer_jax.models.emonet) and its PyTorch weight converter.

Full-size (256x256) checks only trace, except the slow ones. The fast numeric
checks use ``num_head_blocks=2`` at 64x64, which keeps every layer type, both
hourglass stacks and their links, and a quarter of the head.
"""
import math
import pathlib
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.convert import emonet_torch
from fer_jax.models import emonet
from fer_jax.tools.count import count

# Counted analytically from the official code (docs/methods.md section 2.1).
OFFICIAL_PARAMS = 13.963e6
OFFICIAL_FAN_PARAMS = 12.107e6  # stem + hourglasses, frozen
OFFICIAL_HEAD_PARAMS = 1.857e6
OFFICIAL_MACS_256 = 16.93e9  # convolutions + FC at 256x256

SMALL_HEAD_BLOCKS = 2
SMALL_SIDE = emonet.input_size(SMALL_HEAD_BLOCKS)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _leaf_count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _abstract_variables(model, side):
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))


def _random_variables(model, side, seed):
  """Random weights and non-trivial running statistics, without compiling
  ``init`` (which costs more than the forward pass on CPU)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if path[-1] == "kernel":  # unit-variance activations through the convs
      return rng.normal(0, 1 / math.sqrt(math.prod(shape[:-1])), shape)
    if path[-1] in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0, 0.1, shape)  # biases and running means

  flat = traverse_util.flatten_dict(_abstract_variables(model, side))
  return traverse_util.unflatten_dict(
      {path: jnp.asarray(draw(path, leaf.shape), jnp.float32)
       for path, leaf in flat.items()})


@pytest.fixture(scope="module")
def abstract_8_class():
  """The default 8-class model and its variables' shapes at 256x256."""
  model = emonet.EmoNet(num_classes=8)
  return model, _abstract_variables(model, 256)


def test_counts_match_the_official_analytic_counts(abstract_8_class):
  # count() builds the model registered as "emonet" (models.build), so this
  # also checks that the registry entry is the full-size official layout.
  result = count("emonet", (256, 256, 3), num_classes=8, num_va=2)
  assert result["params"] == pytest.approx(OFFICIAL_PARAMS, rel=0.01)
  assert result["macs"] == pytest.approx(OFFICIAL_MACS_256, rel=0.03)

  params = abstract_8_class[1]["params"]
  fan = _leaf_count(params["fan"])
  assert fan == pytest.approx(OFFICIAL_FAN_PARAMS, rel=0.01)
  assert _leaf_count(params) - fan == pytest.approx(OFFICIAL_HEAD_PARAMS,
                                                    rel=0.01)


def test_output_shapes_at_256(abstract_8_class):
  model, variables = abstract_8_class
  logits, aux = jax.eval_shape(
      model.apply, variables, jax.ShapeDtypeStruct((2, 256, 256, 3),
                                                   jnp.float32))
  shapes = {name: value.shape for name, value in aux.items()}
  assert logits.shape == (2, 8)
  assert shapes == {
      "stem": (2, 64, 64, 256), "fan_features": (2, 64, 64, 512),
      "heatmaps": (2, 64, 64, 68), "attention": (2, 64, 64),
      "stage1": (2, 32, 32, 256), "stage2": (2, 16, 16, 256),
      "stage3": (2, 8, 8, 256), "stage4": (2, 4, 4, 256),
      "pooled": (2, 256), "embedding": (2, 128), "va": (2, 2)}


def test_without_va_and_with_grayscale_input():
  model = emonet.EmoNet(num_classes=5, num_va=0)
  variables = _abstract_variables(model, 256)
  logits, aux = jax.eval_shape(
      model.apply, variables, jax.ShapeDtypeStruct((1, 256, 256, 1),
                                                   jnp.float32))
  assert logits.shape == (1, 5)
  assert "va" not in aux


@pytest.mark.parametrize("shape, message", [
    ((1, 128, 128, 3), "use 256x256"),
    ((1, 256, 256, 4), "1 or 3 channels"),
    ((256, 256, 3), "NHWC"),
])
def test_bad_input_is_rejected(abstract_8_class, shape, message):
  model, variables = abstract_8_class
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.apply, variables,
                   jax.ShapeDtypeStruct(shape, jnp.float32))


def _small_images() -> np.ndarray:
  """Two RGB faces of uniform noise in [0, 1), drawn by numpy (no compiled draw)."""
  return np.random.default_rng(1).uniform(size=(2, SMALL_SIDE, SMALL_SIDE, 3)).astype(np.float32)


def test_fan_gets_no_gradient_and_keeps_its_statistics():
  model = emonet.EmoNet(num_classes=8, num_head_blocks=SMALL_HEAD_BLOCKS)
  variables = _random_variables(model, SMALL_SIDE, seed=0)
  images = _small_images()

  def loss(params):
    (logits, aux), updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, images,
        train=True, mutable=["batch_stats"])
    return jnp.sum(logits**2) + jnp.sum(aux["va"]**2), (aux, updates)

  grads, (aux, updates) = jax.jit(jax.grad(loss, has_aux=True))(
      variables["params"])

  fan_grads = traverse_util.flatten_dict(grads["fan"])
  assert all(not np.any(g) for g in fan_grads.values())
  head_grads = {k: v for k, v in grads.items() if k != "fan"}
  assert all(np.any(g) for g in jax.tree.leaves(head_grads))

  old_stats, new_stats = variables["batch_stats"], updates["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, new_stats["fan"],
               old_stats["fan"])
  # The head's BN1d follows PyTorch's momentum 0.1 (Flax momentum 0.9) on the
  # biased batch statistics of its input, FC(pooled).
  hidden = variables["params"]["emo_fc_hidden"]
  pre_bn = (np.asarray(aux["pooled"]) @ np.asarray(hidden["kernel"])
            + np.asarray(hidden["bias"]))
  for stat, batch_value in (("mean", pre_bn.mean(0)), ("var", pre_bn.var(0))):
    np.testing.assert_allclose(
        new_stats["emo_fc_bn"][stat],
        0.9 * old_stats["emo_fc_bn"][stat] + 0.1 * batch_value,
        rtol=1e-4, atol=1e-5)


def test_fan_statistics_move_when_not_frozen():
  model = emonet.EmoNet(num_classes=8, n_stacks=1,
                        num_head_blocks=SMALL_HEAD_BLOCKS,
                        freeze_fan_batch_stats=False)
  variables = _random_variables(model, SMALL_SIDE, seed=0)
  images = _small_images()
  _, updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
          variables, images)
  old = traverse_util.flatten_dict(variables["batch_stats"]["fan"])
  new = traverse_util.flatten_dict(updates["batch_stats"]["fan"])
  assert all(np.any(new[path] != old[path]) for path in old)


# --- converter, against the PyTorch restatement of the official module ---


@pytest.fixture(scope="module")
def torch_reference():
  torch = pytest.importorskip("torch")
  # Imported only now: the reference needs torch at import time.
  from torch_reference import emonet_reference  # pylint: disable=g-import-not-at-top
  return torch, emonet_reference


def _reference_state(torch_reference, n_blocks, seed=0):
  """An eval-mode reference EmoNet with random weights and running stats."""
  torch, reference = torch_reference
  torch.manual_seed(seed)
  net = reference.EmoNet(n_expression=8, n_blocks=n_blocks)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


def _assert_converted_matches(torch_reference, n_blocks, batch):
  torch, _ = torch_reference
  net = _reference_state(torch_reference, n_blocks)
  side = emonet.input_size(n_blocks)
  images = torch.rand(batch, 3, side, side,
                      generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = net(images)

  variables = emonet_torch.convert_state_dict(
      net.state_dict(), 8, num_head_blocks=n_blocks)
  model = emonet.EmoNet(num_classes=8, num_head_blocks=n_blocks)
  logits, aux = jax.jit(model.apply)(
      variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))

  pairs = {
      "expression": (logits, expected["expression"]),
      "valence": (aux["va"][:, 0], expected["valence"]),
      "arousal": (aux["va"][:, 1], expected["arousal"]),
      "heatmap": (aux["heatmaps"], expected["heatmap"].permute(0, 2, 3, 1)),
  }
  for name, (got, want) in pairs.items():
    want = want.numpy()
    scale = np.abs(want).max()
    assert scale > 1e-3, f"{name}: reference output is degenerate"
    np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                               atol=1e-4 * max(scale, 1.0), err_msg=name)


@pytest.mark.torch
def test_converted_weights_reproduce_the_reference(torch_reference):
  _assert_converted_matches(torch_reference, SMALL_HEAD_BLOCKS, batch=2)


@pytest.mark.torch
@pytest.mark.slow
def test_converted_weights_reproduce_the_reference_at_256(torch_reference):
  _assert_converted_matches(torch_reference, 4, batch=1)


@pytest.mark.torch
def test_conversion_is_strict(torch_reference):
  state = _reference_state(torch_reference, SMALL_HEAD_BLOCKS).state_dict()
  convert = lambda sd, n=8: emonet_torch.convert_state_dict(  # noqa: E731
      sd, n, num_head_blocks=SMALL_HEAD_BLOCKS)

  reference = traverse_util.flatten_dict(convert(state))
  # DataParallel prefixes and numpy values convert to the same variables.
  as_numpy = {f"module.{k}": v.numpy() for k, v in state.items()}
  for path, value in traverse_util.flatten_dict(convert(as_numpy)).items():
    np.testing.assert_array_equal(value, reference[path])
  np.testing.assert_array_equal(
      reference[("params", "fan", "m1", "b1_4", "conv1", "kernel")],
      state["m1.b1_4.conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      reference[("params", "emo_fc_out", "kernel")],
      state["emo_fc_2.3.weight"].numpy().T)
  np.testing.assert_array_equal(
      reference[("batch_stats", "fan", "conv2", "bn_downsample", "var")],
      state["conv2.downsample.0.running_var"].numpy())

  missing = dict(state)
  del missing["m1.b2_plus_1.bn1.running_var"]
  with pytest.raises(ValueError, match="fan/m1/b2_plus_1/bn1/var"):
    convert(missing)
  extra = dict(state, **{"emo_net_2.1.weight": state["emo_fc_2.3.bias"]})
  with pytest.raises(ValueError, match=r"emo_net_2\.1\.weight"):
    convert(extra)
  with pytest.raises(ValueError, match=r"emo_fc_2\.3\.weight"):
    convert(state, n=5)


@pytest.mark.torch
def test_load_emonet_reads_a_pth(torch_reference, tmp_path):
  torch, _ = torch_reference
  state = _reference_state(torch_reference, 4).state_dict()
  path = tmp_path / "emonet_8.pth"
  torch.save({f"module.{k}": v for k, v in state.items()}, path)
  loaded = traverse_util.flatten_dict(emonet_torch.load_emonet(path))
  expected = traverse_util.flatten_dict(
      emonet_torch.convert_state_dict(state, 8))
  assert loaded.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.torch
@pytest.mark.slow
def test_cli_writes_a_teacher_model_directory(torch_reference, tmp_path):
  from fer_jax import model_dir  # pylint: disable=g-import-not-at-top
  torch, _ = torch_reference
  state = _reference_state(torch_reference, 4).state_dict()
  torch.save(state, tmp_path / "emonet_8.pth")
  out = tmp_path / "teacher"
  subprocess.run(
      [sys.executable, "-m", "fer_jax.convert.emonet_torch",
       f"--pth={tmp_path / 'emonet_8.pth'}", f"--out={out}"],
      check=True, cwd=REPO_ROOT)
  expected = emonet_torch.convert_state_dict(state, 8)
  restored = model_dir.load(out)
  jax.tree.map(np.testing.assert_array_equal, restored.variables, expected)
  assert (restored.model, restored.num_va, restored.input_shape) == ("emonet", 2, (256, 256, 3))
  assert restored.class_names[:2] == ("neutral", "happy")
