r"""FER2013 PrivateTest accuracy of TFLite conversions of an exported model.

Runs each .tflite through ai-edge-litert (``pip install ai-edge-litert==2.3.0``) on
the 3,589 PrivateTest faces of the FER2013 npz and prints its accuracy and its
top-1 agreement with the JAX model it was exported from. The input type is read
from the file: uint8 faces, float32 pixels (0-255), or int8 with the file's
scale and zero point (onnx2tf's full-integer model). docs/export.md ('TFLite')
has the conversions (``python -m fer_jax.export --format=tflite [--int8]``):

  python -m experiments.tflite_accuracy --model=fer2013-student fer.tflite fer_int8.tflite
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fer_jax import cli
from fer_jax import export
from fer_jax import model_dir

FLAGS = flags.FLAGS
PRIVATE_TEST = 2


def private_test(npz: str, class_names) -> tuple[np.ndarray, np.ndarray]:
  """uint8 PrivateTest faces and their labels, in the model's class order."""
  with np.load(npz) as data:
    names = [str(n) for n in data["emotion_names"]]
    labels = data["emotion"][data["usage"] == PRIVATE_TEST]
  if names != list(class_names):
    raise ValueError(f"{npz}: classes {names}, the model's are {list(class_names)}")
  return export.fer2013_faces(npz, PRIVATE_TEST), labels


def main(argv):
  paths = argv[1:]
  if importlib.util.find_spec("ai_edge_litert") is None:
    cli.fail("tflite_accuracy needs ai-edge-litert: pip install ai-edge-litert==2.3.0")
  missing = [p for p in paths if not pathlib.Path(p).is_file()] or ([] if paths else ["(none)"])
  if missing:
    cli.fail(f"no .tflite file at {', '.join(missing)}: expected the files to evaluate")
  try:
    model = model_dir.load(FLAGS.model)
    faces, labels = private_test(FLAGS.npz, model.class_names)
  except (model_dir.ModelDirError, export.ExportError, ValueError, KeyError) as e:
    cli.fail(e)
  logits = np.asarray(jax.jit(model.apply)(jnp.asarray(faces))[0])
  reference = logits.argmax(-1)
  print(f"JAX {FLAGS.model}: {100 * np.mean(reference == labels):.2f} % PrivateTest "
        f"({len(labels)} faces)")
  for path in paths:
    try:
      top1 = export.tflite_outputs(path, faces)["probabilities"].argmax(-1)
    except (ValueError, RuntimeError) as e:  # not a TFLite model, or one that cannot run
      cli.fail(f"{path}: {e}")
    print(f"{path}: {100 * np.mean(top1 == labels):.2f} % PrivateTest, "
          f"{100 * np.mean(top1 == reference):.1f} % top-1 agreement with JAX")


if __name__ == "__main__":
  flags.DEFINE_string("model", "fer2013-student", "The exported model's directory or name.")
  flags.DEFINE_string("npz", str(export.DEFAULT_CALIBRATION), "The FER2013 npz.")
  cli.run(main)
