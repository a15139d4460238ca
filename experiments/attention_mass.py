"""Does the AFNet teacher's region attention move off an occluder?

For every test face and each synthetic occluder of the fixed protocol
(docs/occlusion_protocol.md), the occluder's box is the set of pixels it
changed, area-averaged onto the grid of the teacher's attention maps. The
attention mass inside it (each head's map sums to 1; heads averaged) is
measured on the occluded face and on the clean face, at the same box. A region
attention that down-weights occluded regions puts less mass there once the
occluder is drawn. ``uniform`` is the mass a flat map would put in the box.

  python -m experiments.attention_mass --model=DIR --data=fer2013 \
      --out=experiments/fer2013_cpu/attention_mass.json
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fer_jax import cli
from fer_jax import config_utils
from fer_jax import model_dir
from fer_jax import train
from fer_jax.data import occlusion

_MODEL = flags.DEFINE_string("model", None, "The AFNet teacher's model directory.")
_DATA = flags.DEFINE_string("data", "fer2013", "A data preset.")
_OUT = flags.DEFINE_string("out", "", "Also write the table (JSON) here.")
KINDS = ("eyes", "mouth", "blocks", "hand")


def box_on_grid(clean: jax.Array, occluded: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """The fraction of each attention cell ``[B, h, w]`` that the occluder covers."""
  changed = jnp.any(clean != occluded, axis=-1).astype(jnp.float32)
  b, height, width = changed.shape
  h, w = grid
  return changed.reshape(b, h, height // h, w, width // w).mean(axis=(2, 4))


def attention_and_weights(model: model_dir.TrainedModel, variables, images):
  """The heads' mean attention map ``[B, h, w]`` and the region weights ``[B, K]``."""
  _, aux = model.module().apply(variables, model.preprocess(images), train=False)
  return aux["att_map"].mean(-1), aux["region_weights"]


def measure(model: model_dir.TrainedModel, images, indices, kind: str,
            batch: int = 256) -> dict:
  """Mean attention mass in the occluder's box and region weight, clean and occluded."""
  @jax.jit
  def one_batch(variables, clean, idx):
    occluded = occlusion.occlude_fixed(clean, idx, kind, seed=0)
    att_clean, weights_clean = attention_and_weights(model, variables, clean)
    att_occluded, weights_occluded = attention_and_weights(model, variables, occluded)
    box = box_on_grid(clean, occluded, att_clean.shape[1:])
    return jnp.stack([jnp.sum(att_clean * box, (1, 2)), jnp.sum(att_occluded * box, (1, 2)),
                      box.mean((1, 2)), weights_clean.mean(-1), weights_occluded.mean(-1)], -1)

  rows = np.concatenate([np.asarray(one_batch(model.variables, images[i:i + batch],
                                              indices[i:i + batch]))
                         for i in range(0, len(images), batch)])
  names = ("mass_clean", "mass_occluded", "uniform", "weight_clean", "weight_occluded")
  return {name: float(value) for name, value in zip(names, rows.mean(0))}


def main(argv):
  del argv
  model = model_dir.load(_MODEL.value)
  data_cfg = config_utils.data_config(_DATA.value)
  _, arrays = train.load_data(data_cfg)
  test = arrays[data_cfg.test_split]
  table = {kind: measure(model, test["image"], test["index"], kind) for kind in KINDS}
  text = json.dumps({"model": model.model, "model_kwargs": model.model_kwargs,
                     "split": data_cfg.test_split, **table}, indent=1)
  print(text)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(text + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  cli.run(main)
