r"""FER2013 PrivateTest accuracy of TFLite conversions of an exported model.

Runs each .tflite through ai-edge-litert (``pip install ai-edge-litert==2.3.0``) on
the 3,589 PrivateTest faces of the FER2013 npz and prints its accuracy and its
top-1 agreement with the JAX model it was exported from. The input type is read
from the file: uint8 faces, float32 pixels (0-255), or int8 with the file's
scale and zero point (onnx2tf's full-integer model). docs/export.md ('TFLite')
has the conversions:

  python -m experiments.tflite_accuracy --model=fer2013-student \
      out/model_float32.tflite out/model_float_integer_quant.tflite
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

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


def as_input(faces: np.ndarray, detail: dict) -> np.ndarray:
  """uint8 faces as the interpreter's input: its dtype, quantised when it is int8."""
  if detail["dtype"] == np.int8:
    scale, zero_point = detail["quantization"]
    return np.clip(np.round(faces / scale + zero_point), -128, 127).astype(np.int8)
  return faces.astype(detail["dtype"])


def tflite_probabilities(path: str, faces: np.ndarray) -> np.ndarray:
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  except ImportError:
    cli.fail("tflite_accuracy needs ai-edge-litert: pip install ai-edge-litert==2.3.0")
  interpreter = Interpreter(model_path=path)
  source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  interpreter.resize_tensor_input(source["index"], list(faces.shape))
  interpreter.allocate_tensors()
  interpreter.set_tensor(source["index"], as_input(faces, source))
  interpreter.invoke()
  out = interpreter.get_tensor(target["index"]).astype(np.float32)
  if target["dtype"] != np.float32:
    scale, zero_point = target["quantization"]
    out = (out - zero_point) * scale
  return out


def main(argv):
  paths = argv[1:]
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
      top1 = tflite_probabilities(path, faces).argmax(-1)
    except (ValueError, RuntimeError) as e:  # not a TFLite model, or one that cannot run
      cli.fail(f"{path}: {e}")
    print(f"{path}: {100 * np.mean(top1 == labels):.2f} % PrivateTest, "
          f"{100 * np.mean(top1 == reference):.1f} % top-1 agreement with JAX")


if __name__ == "__main__":
  flags.DEFINE_string("model", "fer2013-student", "The exported model's directory or name.")
  flags.DEFINE_string("npz", str(export.DEFAULT_CALIBRATION), "The FER2013 npz.")
  app.run(main)
