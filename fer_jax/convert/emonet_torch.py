"""Converts the official PyTorch EmoNet weights into ``fer_jax`` Flax variables.

The official model (github.com/face-analysis/emonet, Toisoul et al., Nature
Machine Intelligence 2021) is released as ``emonet_8.pth`` and ``emonet_5.pth``
state dicts. ``fer_jax.models.emonet.EmoNet`` keeps the official submodule
names, so a key maps by a fixed rule:

  * FAN keys (``conv1``, ``bn1``, ``conv2``-``conv4``, ``m{i}.*``,
    ``top_m_{i}``, ``conv_last{i}``, ``bn_end{i}``, ``l{i}``, ``bl{i}``,
    ``al{i}``) move under ``'fan'``; the head's ``conv1x1_input_emo_2`` stays
    at the top; ``emo_net_2.{2k}`` becomes ``emo_block_{k}`` and
    ``emo_fc_2.{0,1,3}`` become ``emo_fc_hidden``, ``emo_fc_bn``,
    ``emo_fc_out``; a ConvBlock's
    ``downsample.0`` / ``downsample.2`` become ``bn_downsample`` /
    ``conv_downsample``;
  * conv weights go OIHW -> HWIO, linear weights [out, in] -> [in, out], a
    norm's ``weight`` becomes ``scale``, ``running_mean`` / ``running_var``
    become ``'batch_stats'`` ``mean`` / ``var``, and ``num_batches_tracked``
    is dropped (Flax keeps no such counter).

A leading ``module.`` (from ``nn.DataParallel``) is stripped, as the official
demo does. Conversion is strict: a key with no counterpart, a shape mismatch or
a Flax leaf left unfilled raises and names them.

Command line (writes a model directory, ``fer_jax.model_dir``, for use as a
teacher: ``--config.teacher.checkpoint=DIR``):

  python -m fer_jax.convert.emonet_torch --pth=emonet_8.pth --out=DIR

Reading a .pth needs PyTorch (the ``torch_reference`` extra); it is imported
only there. Licence: the EmoNet code and weights are CC BY-NC-ND 4.0; fer_jax
does not ship them. Download them yourself from the official repository and
keep the converted checkpoint under the same terms.
"""
import os
from typing import Any, Mapping

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fer_jax import cli
from fer_jax import model_dir
from fer_jax.data import classes
from fer_jax.models import emonet

_N_REG = 2  # the official head always ends in valence and arousal
_FC_RENAMES = {"0": "emo_fc_hidden", "1": "emo_fc_bn", "3": "emo_fc_out"}
_DOWNSAMPLE_RENAMES = {"0": "bn_downsample", "2": "conv_downsample"}
_HEAD_TOP_LEVEL = "conv1x1_input_emo_2"


def convert_state_dict(state_dict: Mapping[str, Any], n_expression: int, *,
                       n_stacks: int = 2,
                       num_head_blocks: int = 4) -> dict[str, Any]:
  """Maps an official EmoNet state dict onto ``EmoNet`` Flax variables.

  Args:
    state_dict: official key -> ``np.ndarray`` or ``torch.Tensor``.
    n_expression: expression classes of the checkpoint (8 or 5).
    n_stacks: hourglasses (official ``num_modules``).
    num_head_blocks: head blocks (official ``n_blocks``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for
    ``EmoNet(num_classes=n_expression, num_va=2, n_stacks=n_stacks,
    num_head_blocks=num_head_blocks)``.

  Raises:
    ValueError: naming every unmatched key, shape mismatch and unfilled leaf.
  """
  model = emonet.EmoNet(num_classes=n_expression, num_va=_N_REG,
                        n_stacks=n_stacks, num_head_blocks=num_head_blocks)
  side = emonet.input_size(num_head_blocks)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
  expected = traverse_util.flatten_dict(abstract)

  filled = {}
  unexpected, mismatched = [], []
  for key, value in _strip_data_parallel(state_dict).items():
    value = _to_numpy(value)
    target = _flax_path(key, value.ndim)
    if target == ():
      continue  # num_batches_tracked: consumed, nothing to fill
    if target not in expected:
      unexpected.append(key)
      continue
    value = _to_flax_layout(value)
    if value.shape != expected[target].shape:
      mismatched.append(f"{key} {value.shape} -> {'/'.join(target)} "
                        f"{expected[target].shape}")
      continue
    filled[target] = jnp.asarray(value, dtype=expected[target].dtype)

  missing = sorted("/".join(path) for path in expected.keys() - filled.keys())
  problems = []
  if unexpected:
    problems.append(f"keys with no EmoNet counterpart: {sorted(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches (in Flax layout): {mismatched}")
  if missing:
    problems.append(f"Flax leaves left unfilled: {missing}")
  if problems:
    raise ValueError(
        f"emonet_torch: state dict does not match EmoNet(num_classes="
        f"{n_expression}, n_stacks={n_stacks}, num_head_blocks="
        f"{num_head_blocks}); " + "; ".join(problems))
  return traverse_util.unflatten_dict(filled)


def load_emonet(path: str | os.PathLike,
                n_expression: int | None = None) -> dict[str, Any]:
  """Reads an official ``.pth`` and converts it (see ``convert_state_dict``).

  ``n_expression`` defaults to the width of the checkpoint's last layer minus
  valence and arousal.
  """
  import torch  # pylint: disable=g-import-not-at-top  # optional extra

  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path}: expected a state dict (key -> tensor), got "
                     f"{type(state_dict).__name__}")
  state_dict = _strip_data_parallel(state_dict)
  if n_expression is None:
    n_expression = _checkpoint_n_expression(state_dict, path)
  return convert_state_dict(state_dict, n_expression)


def _checkpoint_n_expression(state_dict: Mapping[str, Any],
                            source: str | os.PathLike = "state dict") -> int:
  """Expression classes of an official state dict, read off its last layer."""
  last_bias = "emo_fc_2.3.bias"
  if last_bias not in state_dict:
    raise ValueError(f"{source}: no {last_bias!r}; is this an EmoNet state "
                     f"dict?")
  return int(_to_numpy(state_dict[last_bias]).shape[0]) - _N_REG


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  stripped = {}
  for key, value in state_dict.items():
    name = key.removeprefix("module.")
    if name in stripped:
      raise ValueError(f"emonet_torch: state dict holds both {name!r} and "
                       f"'module.{name}'")
    stripped[name] = value
  return stripped


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # linear [out, in] -> [in, out]
    return value.T
  return value


def _flax_path(key: str, ndim: int) -> tuple[str, ...] | None:
  """(collection, *module path, leaf) for an official key; () to drop it.

  Returns None when the key fits no rule, which the caller reports.
  """
  *modules, leaf = key.split(".")
  if leaf == "num_batches_tracked":
    return ()
  leaf_targets = {
      "weight": ("params", "scale" if ndim == 1 else "kernel"),
      "bias": ("params", "bias"),
      "running_mean": ("batch_stats", "mean"),
      "running_var": ("batch_stats", "var"),
  }
  if leaf not in leaf_targets or not modules:
    return None
  collection, flax_leaf = leaf_targets[leaf]

  head, rest = modules[0], modules[1:]
  # emo_net_2 interleaves ConvBlocks (even indices) with parameter-free pools.
  if (head == "emo_net_2" and rest and rest[0].isdigit()
      and int(rest[0]) % 2 == 0):
    path = [f"emo_block_{int(rest[0]) // 2}"] + rest[1:]
  elif head == "emo_fc_2" and rest and rest[0] in _FC_RENAMES:
    path = [_FC_RENAMES[rest[0]]] + rest[1:]
  elif head == _HEAD_TOP_LEVEL or head in ("emo_net_2", "emo_fc_2"):
    path = modules  # an unmatched index falls through as unexpected
  else:
    path = ["fan"] + modules

  renamed = []
  for part in path:
    if renamed and renamed[-1] == "downsample":
      renamed[-1] = _DOWNSAMPLE_RENAMES.get(part, f"downsample.{part}")
    else:
      renamed.append(part)
  return (collection, *renamed, flax_leaf)


def trained_model(variables, n_expression: int) -> model_dir.TrainedModel:
  """EmoNet as a model directory: 256x256 RGB in [0, 1], AffectNet's class order.

  The 5-class checkpoint keeps the first five AffectNet classes, as EmoNet's
  demo labels them.
  """
  return model_dir.TrainedModel(
      model="emonet", model_kwargs={"num_va": _N_REG},
      class_names=classes.AFFECTNET8[:n_expression], variables=variables,
      image_shape=(256, 256, 3), input_shape=(256, 256, 3), mean=(0.0, 0.0, 0.0),
      std=(1.0, 1.0, 1.0), num_va=_N_REG)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  variables = load_emonet(flags.FLAGS.pth, flags.FLAGS.n_expression)
  n_expression = variables["params"]["emo_fc_out"]["bias"].shape[0] - _N_REG
  out = trained_model(variables, n_expression).save(os.path.abspath(flags.FLAGS.out))
  print(f"saved EmoNet(num_classes={n_expression}, num_va={_N_REG}) "
        f"variables from {flags.FLAGS.pth} to {out}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module
  # cannot clash with another tool's flags.
  flags.DEFINE_string("pth", None, "Official EmoNet .pth state dict.",
                      required=True)
  flags.DEFINE_string("out", None, "Model directory to create.",
                      required=True)
  flags.DEFINE_integer("n_expression", None,
                       "Expression classes; read off the checkpoint if unset.")
  cli.run(main)
