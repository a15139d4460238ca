"""ONNX export (fer_jax/export.py): parity with JAX, every student family, int8.

Needs the ``export`` extra (jax2onnx, onnx, onnxruntime); skipped without it.
The default run exports the shipped student's model directory (fp32 and int8) and
the cheapest family with a V/A head (a thin VGG), so the 'va' output is checked too;
the other families are ``slow`` (``pytest -m slow tests/test_export.py``).
docs/export.md has the table. The TFLite tests need onnx2tf in its own Python
3.12 venv, named by ``FER_JAX_ONNX2TF`` (docs/export.md, 'TFLite'), and
ai-edge-litert; they are skipped without them.
"""
import collections
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax2onnx", reason='the export extra is not installed: '
                    'pip install -e ".[export]"')
pytest.importorskip("onnxruntime", reason='the export extra is not installed: '
                    'pip install -e ".[export]"')
onnx = pytest.importorskip("onnx", reason='the export extra is not installed: '
                           'pip install -e ".[export]"')

from fer_jax import export  # noqa: E402
from fer_jax import model_dir  # noqa: E402

FER2013_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
IMAGE_SHAPE = (48, 48, 1)
PARITY_ATOL = 1e-4
STUDENT = "fer2013-student"

# The zoo's students at 48x48x1 (the CPU-budget sizes of the configs), and the
# AFNet teacher on a thin ResNet-18. Each gets a 2-output V/A head as well, so
# the 'va' output is exported too.
FAMILIES = {
    "mobilenet_v2": dict(width=0.5, stem="imagenet"),
    "mobilefacenet": {},
    "mini_xception": {},
    "efficientformer_l1": {},
    "resnet18": dict(stem="small", width=8),
    "vgg_fer": dict(fc_width=0, width=8),
    "afnet": dict(backbone="resnet18", backbone_kwargs=(("stem", "small"), ("width", 8)),
                  fpn_dim=8, embed_dim=8),
}
# The shipped student (vgg_fer, no V/A head) is the default run's parity model; the thin
# VGG with a V/A head checks the second output. The other families (2-20 s each) run with
# `python -m pytest -m slow tests/test_export.py`.
FAST_FAMILIES = ("vgg_fer",)


def _perturbed(variables, seed):
  """BatchNorm statistics and every scale/bias moved off their init values, so
  that BatchNorm is not the identity and biases are not zero."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, value in leaves:
    name, value = path[-1].key, np.asarray(value, np.float32)
    noise = rng.standard_normal(value.shape, np.float32)
    if name == "mean":
      value = 0.1 * noise
    elif name == "var":
      value = rng.uniform(0.5, 1.5, value.shape)
    elif name in ("scale", "bias"):
      value = value + 0.1 * noise
    out.append(value.astype(np.float32))
  return jax.tree_util.tree_unflatten(tree, out)


def _trained_model(name, model_kwargs, input_shape=IMAGE_SHAPE, **fields):
  spec = model_dir.TrainedModel(model=name, model_kwargs=model_kwargs,
                                class_names=FER2013_NAMES, variables=None,
                                image_shape=IMAGE_SHAPE, input_shape=input_shape, **fields)
  module = spec.module()
  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, *input_shape)), train=False))
  return dataclasses.replace(spec, variables=_perturbed(init(jax.random.key(0)), seed=1))


def _faces(npz, usage, count):
  return export.fer2013_faces(npz, usage=usage, count=count, seed=0)


@pytest.fixture(scope="module")
def npz(shared_data):
  path = shared_data / "fer2013" / "fer2013.npz"
  if not path.is_file():
    pytest.skip(f"FER2013 npz not found at {path}")
  return path


@pytest.fixture(scope="module")
def parity_model(tmp_path_factory):
  """The shipped, trained FER2013 student (a copy of its model directory) and its fp32
  ONNX export written by the command line."""
  folder = tmp_path_factory.mktemp("export")
  model_dir.load(STUDENT).save(folder / "model")
  out = folder / "model.onnx"
  assert export.main([f"--model={folder / 'model'}", "--format=onnx", f"--out={out}"]) == 0
  return model_dir.load(folder / "model"), out


@pytest.fixture(scope="module")
def int8_model(parity_model, npz):
  trained, fp32 = parity_model
  out = fp32.with_name("model_int8.onnx")
  directory = fp32.with_name("model")
  assert export.main([f"--model={directory}", f"--out={out}", "--int8",
                      f"--calibration={npz}", "--calibration_count=256"]) == 0
  return trained, fp32, out


# --- errors ----------------------------------------------------------------------------


def test_missing_model_is_one_line_exit_2(capsys, tmp_path):
  assert export.main(["--model=no-such-model", f"--out={tmp_path / 'x.onnx'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert "no-such-model: neither a model directory nor a shipped model name" in err
  assert not (tmp_path / "x.onnx").exists()


def test_directory_that_is_not_a_model_is_one_line_exit_2(capsys, tmp_path):
  assert export.main([f"--model={tmp_path}", f"--out={tmp_path / 'x.onnx'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "model.json" in err


def test_missing_extra_names_the_pip_command(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(__import__("sys").modules, "jax2onnx", None)  # import fails
  assert export.main(["--model=anything", f"--out={tmp_path / 'x.onnx'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and 'pip install -e ".[export]"' in err and "jax2onnx" in err


def test_unconvertible_op_is_named(parity_model, monkeypatch, capsys, tmp_path):
  """A forward pass with a primitive jax2onnx has no converter for (min-pooling)."""
  trained, _ = parity_model

  def min_pool_model(_):
    def infer(images):
      x = images.astype(jnp.float32)
      pooled = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")
      return (pooled.reshape(x.shape[0], -1)[:, :7],)
    return infer

  monkeypatch.setattr(export, "inference_fn", min_pool_model)
  with pytest.raises(export.ExportError, match=r"'vgg_fer' .*\(op reduce_window_min\)"):
    export.to_onnx(trained)
  directory = tmp_path / "model"
  trained.save(directory)
  assert export.main([f"--model={directory}", f"--out={tmp_path / 'x.onnx'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "reduce_window_min" in err


@pytest.mark.parametrize("dilation", [1, 2])
def test_max_pool_forms_match_lax(parity_model, monkeypatch, dilation):
  """A ResNet stem's 3x3/2 pool with padding 1 becomes a MaxPool; dilated, it has no
  MaxPool form and becomes the maximum of strided slices."""
  trained, _ = parity_model

  def pool_model(_):
    def infer(images):
      x = images.astype(jnp.float32)
      pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                     ((0, 0), (1, 1), (1, 1), (0, 0)),
                                     window_dilation=(1, dilation, dilation, 1))
      return (pooled.reshape(x.shape[0], -1)[:, :7],)
    return infer

  monkeypatch.setattr(export, "inference_fn", pool_model)
  proto = export.to_onnx(trained)
  images = np.random.default_rng(0).integers(0, 256, (2, *IMAGE_SHAPE), np.uint8)
  got = export.run(export.session(proto), images)["probabilities"]
  want = jax.nn.softmax(pool_model(None)(jnp.asarray(images))[0], axis=-1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  ops = {node.op_type for node in proto.graph.node}
  assert ("MaxPool" in ops) == (dilation == 1) and ("Max" in ops) == (dilation > 1)


# --- fp32 parity -------------------------------------------------------------------------


def test_graph_interface(parity_model):
  trained, path = parity_model
  proto = onnx.load(path)
  onnx.checker.check_model(proto)
  (images,) = proto.graph.input
  assert images.name == "images"
  assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  dims = images.type.tensor_type.shape.dim
  assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(IMAGE_SHAPE)
  assert [o.name for o in proto.graph.output] == ["probabilities"]  # num_va = 0
  meta = {p.key: p.value for p in proto.metadata_props}
  assert json.loads(meta["class_names"]) == list(trained.class_names)
  assert json.loads(meta["image_shape"]) == list(IMAGE_SHAPE)
  ops = collections.Counter(node.op_type for node in proto.graph.node)
  assert ops["Conv"] == 8 and "BatchNormalization" not in ops  # BN folded into the convs
  # Each 2x2 max-pool is one MaxPool (not strided Slices), the softmax one node and
  # the Dense bias part of its Gemm.
  assert ops["MaxPool"] == 4 and "Slice" not in ops and "Max" not in ops
  (gemm,) = [node for node in proto.graph.node if node.op_type == "Gemm"]
  assert ops["Softmax"] == 1 and len(gemm.input) == 3


@pytest.fixture(scope="module")
def public_faces(parity_model, npz):
  """64 PublicTest faces and JAX's probabilities for them (one compile serves both
  batch sizes: inference is per-sample, so row 0 is the batch-1 answer)."""
  trained, _ = parity_model
  images = _faces(npz, usage=1, count=64)
  return images, np.asarray(jax.nn.softmax(trained.apply(jnp.asarray(images))[0], axis=-1))


@pytest.mark.parametrize("batch", [1, 64])
def test_parity_on_fer2013_faces(parity_model, public_faces, batch):
  _, path = parity_model
  images, want = public_faces
  got = export.run(export.session(path, threads=2), images[:batch])["probabilities"]
  assert got.shape == (batch, 7) and got.dtype == np.float32
  np.testing.assert_allclose(got, want[:batch], rtol=0, atol=PARITY_ATOL)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(model_dir.pretrained_names()) - {STUDENT}))
def test_parity_of_the_other_shipped_models(name, npz, tmp_path):
  """The other shipped models (fer_jax.predict's default and the FER+ teacher among them)
  export to the probabilities fer_jax computes, on the same 64 PublicTest faces."""
  out = tmp_path / "model.onnx"
  assert export.main([f"--model={name}", f"--out={out}"]) == 0
  images = _faces(npz, usage=1, count=64)
  want = jax.nn.softmax(export.load_model(name).apply(jnp.asarray(images))[0], axis=-1)
  got = export.run(export.session(out, threads=2), images)["probabilities"]
  np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=PARITY_ATOL)


def test_float_input_graph_matches_uint8(parity_model, public_faces):
  """--input_dtype=float32 takes the same pixels as floats: no Cast, the same outputs."""
  trained, path = parity_model
  out = path.with_name("model_float.onnx")
  assert export.main([f"--model={path.with_name('model')}", f"--out={out}",
                      "--input_dtype=float32"]) == 0
  proto = onnx.load(out)
  (images_in,) = proto.graph.input
  assert images_in.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
  assert "Cast" not in {node.op_type for node in proto.graph.node}
  assert "float32" in {p.key: p.value for p in proto.metadata_props}["input"]
  images, _ = public_faces
  sess = export.session(out)
  got = sess.run(["probabilities"], {"images": images.astype(np.float32)})[0]
  want = export.run(export.session(path), images)["probabilities"]
  np.testing.assert_array_equal(got, want)


# --- TFLite -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx2tf():
  executable = shutil.which(os.environ.get("FER_JAX_ONNX2TF", ""))
  if not executable:
    pytest.skip("FER_JAX_ONNX2TF names no onnx2tf executable (python3.12 -m venv V && "
                "V/bin/pip install onnx2tf==2.6.9; FER_JAX_ONNX2TF=V/bin/onnx2tf)")
  pytest.importorskip("ai_edge_litert", reason="pip install ai-edge-litert==2.3.0")
  return executable


def test_tflite_without_onnx2tf_is_one_line_exit_2(parity_model, capsys, tmp_path):
  _, path = parity_model
  code = export.main([f"--model={path.with_name('model')}", "--format=tflite",
                      f"--out={tmp_path / 'm.tflite'}", f"--onnx2tf={tmp_path / 'none'}"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "onnx2tf==2.6.9" in err
  assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize("int8", [False, True])
def test_tflite_matches_jax_on_fer2013_faces(parity_model, public_faces, npz, onnx2tf,
                                             tmp_path, int8):
  """fp32: probabilities within 1e-4 of JAX; int8: the same top-1 on >= 95 % of faces."""
  _, path = parity_model
  out = tmp_path / "model.tflite"
  assert export.main([f"--model={path.with_name('model')}", "--format=tflite",
                      f"--out={out}", f"--onnx2tf={onnx2tf}",
                      *(["--int8", f"--calibration={npz}"] if int8 else [])]) == 0
  images, want = public_faces
  got = export.tflite_outputs(out.read_bytes(), images)["probabilities"]
  if int8:
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
  else:
    np.testing.assert_allclose(got, want, rtol=0, atol=PARITY_ATOL)


def test_tflite_va_head_matches_jax(public_faces, onnx2tf, tmp_path):
  """A model with a V/A head: both TFLite outputs, found by name, within 1e-4 of JAX."""
  trained = _trained_model("vgg_fer", dict(FAMILIES["vgg_fer"], num_va=2), num_va=2)
  trained.save(tmp_path / "model")
  out = tmp_path / "model.tflite"
  assert export.main([f"--model={tmp_path / 'model'}", "--format=tflite", f"--out={out}",
                      f"--onnx2tf={onnx2tf}"]) == 0
  images = public_faces[0][:16]
  got = export.tflite_outputs(out.read_bytes(), images)
  logits, va = trained.apply(jnp.asarray(images))
  assert sorted(got) == ["probabilities", "va"]
  np.testing.assert_allclose(got["probabilities"], jax.nn.softmax(logits, -1), rtol=0,
                             atol=PARITY_ATOL)
  np.testing.assert_allclose(got["va"], va, rtol=0, atol=PARITY_ATOL)


def test_parity_needs_every_output(monkeypatch):
  """A V/A model whose exported file lacks 'va' fails the parity check; it is not
  compared on its probabilities alone."""
  trained = _trained_model("vgg_fer", dict(FAMILIES["vgg_fer"], num_va=2), num_va=2)
  images = np.random.default_rng(0).integers(0, 256, (2, *IMAGE_SHAPE), np.uint8)
  probabilities = np.asarray(jax.nn.softmax(trained.apply(jnp.asarray(images))[0], -1))
  monkeypatch.setattr(export, "tflite_outputs",
                      lambda model, images: {"probabilities": probabilities})
  with pytest.raises(export.ExportError, match=r"outputs are \['probabilities'\], expected"):
    export.verify_tflite(trained, b"", images)


# --- every family -------------------------------------------------------------------------


def _check_family(name, model_kwargs, input_shape=IMAGE_SHAPE):
  trained = _trained_model(name, dict(model_kwargs, num_va=2), input_shape, num_va=2)
  proto = export.to_onnx(trained)
  assert [o.name for o in proto.graph.output] == ["probabilities", "va"]
  images = np.random.default_rng(0).integers(0, 256, (3, *IMAGE_SHAPE), np.uint8)
  got = export.run(export.session(proto), images)
  logits, va = trained.apply(jnp.asarray(images))
  want = np.asarray(jax.nn.softmax(logits, -1))
  np.testing.assert_allclose(got["probabilities"], want, atol=PARITY_ATOL)
  np.testing.assert_allclose(got["va"], va, atol=PARITY_ATOL)
  print(f"{name}: max |probability difference| {np.abs(got['probabilities'] - want).max():.2g}")
  return sorted({node.op_type for node in proto.graph.node})


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in FAST_FAMILIES else pytest.mark.slow) for n in FAMILIES])
def test_family_converts(name):
  ops = _check_family(name, FAMILIES[name])
  print(f"{name}: converts; ops {ops}")


@pytest.mark.slow
def test_resize_and_channels_are_in_the_graph():
  """A model whose input_shape differs from the stored image shape (48x48 grey ->
  64x64 RGB, bilinear, as in training)."""
  _check_family("vgg_fer", FAMILIES["vgg_fer"], input_shape=(64, 64, 3))


# --- int8 ---------------------------------------------------------------------------------


def test_int8_runs_is_quantised_and_agrees_with_fp32(int8_model, npz):
  """The shipped student quantised: every conv kernel int8, and its top-1 agrees with
  fp32 on PublicTest faces (the accuracy lost is measured by the slow test below)."""
  _, fp32, int8 = int8_model
  proto = onnx.load(int8)
  ops = {node.op_type for node in proto.graph.node}
  assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
  int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8
                  and len(i.dims) == 4]
  convs = [n for n in onnx.load(fp32).graph.node if n.op_type == "Conv"]
  assert len(int8_weights) >= len(convs)  # every conv kernel (and more) is int8
  assert max(_int8_peak(w) for w in int8_weights) <= 64  # 7 bits, the default
  assert int8.stat().st_size < 0.4 * fp32.stat().st_size
  images = _faces(npz, usage=1, count=256)
  for batch in (1, 64):
    probabilities = export.run(export.session(int8, threads=2), images[:batch])["probabilities"]
    assert probabilities.shape == (batch, 7)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-3)
  top1 = [export.run(export.session(path, threads=2), images)["probabilities"].argmax(-1)
          for path in (fp32, int8)]
  assert np.mean(top1[0] == top1[1]) >= 0.9
  meta = {p.key: p.value for p in proto.metadata_props}
  assert json.loads(meta["class_names"]) == list(FER2013_NAMES) and "quantization" in meta


def _int8_peak(initializer) -> int:
  return int(np.abs(onnx.numpy_helper.to_array(initializer).astype(int)).max())


def test_int8_weight_bits_8_uses_the_full_range(parity_model, npz):
  """Without reduce_range each per-channel symmetric kernel spans [-127, 127]. (Not run
  through the export: on CPUs without VNNI its saturating sums fail the agreement gate.)"""
  trained, _ = parity_model
  proto = export.quantize_int8(export.to_onnx(trained), _faces(npz, usage=0, count=64), 8)
  kernels = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8
             and len(i.dims) == 4]
  assert kernels and min(_int8_peak(k) for k in kernels) == 127
  assert "8-bit" in {p.key: p.value for p in proto.metadata_props}["quantization"]


@pytest.mark.parametrize("flags", [["--int8_weight_bits=8"],
                                   ["--int8", "--int8_weight_bits=8", "--format=tflite"]])
def test_int8_weight_bits_outside_onnx_int8_is_one_line_exit_2(parity_model, capsys, tmp_path,
                                                               flags):
  _, fp32 = parity_model
  out = tmp_path / "x.onnx"
  assert export.main([f"--model={fp32.with_name('model')}", f"--out={out}", *flags]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--int8_weight_bits" in err and not out.exists()


def test_int8_needs_the_calibration_npz(parity_model, capsys, tmp_path):
  _, fp32 = parity_model
  missing = tmp_path / "none.npz"
  assert export.main([f"--model={fp32.with_name('model')}", f"--out={tmp_path / 'x.onnx'}",
                      "--int8", f"--calibration={missing}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "none.npz" in err


def test_int8_that_disagrees_with_jax_is_not_written(parity_model, npz, monkeypatch,
                                                     capsys, tmp_path):
  """A quantised model whose top-1 strays from JAX's on the calibration faces (here: the
  fp32 graph of other weights) is refused, not written."""
  trained, fp32 = parity_model
  other = dataclasses.replace(trained, variables=_perturbed(trained.variables, seed=7))
  monkeypatch.setattr(export, "quantize_int8", lambda proto, images, bits: export.to_onnx(other))
  out = tmp_path / "x.onnx"
  assert export.main([f"--model={fp32.with_name('model')}", f"--out={out}", "--int8",
                      f"--calibration={npz}", "--calibration_count=64"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "of the calibration faces" in err and not out.exists()


@pytest.mark.slow
def test_int8_agreement_on_trained_student(npz, tmp_path):
  """int8 against fp32 on the shipped student: top-1 agreement on 256 PrivateTest
  faces, and the accuracy lost on all of PrivateTest (calibrated on Training images)."""
  if STUDENT not in model_dir.pretrained_names():
    pytest.skip(f"no trained student {STUDENT!r} in {model_dir.pretrained_dir()}")
  fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
  assert export.main([f"--model={STUDENT}", f"--out={fp32}"]) == 0
  assert export.main([f"--model={STUDENT}", f"--out={int8}", "--int8",
                      f"--calibration={npz}"]) == 0
  with np.load(npz) as data:
    private = data["usage"] == 2
    images, labels = data["pixels"][private][..., None], data["emotion"][private]
  trained = export.load_model(STUDENT)
  images = export.adapt_images(images, trained.image_shape)
  predictions = {}
  for name, path in (("fp32", fp32), ("int8", int8)):
    sess = export.session(path, threads=2)
    predictions[name] = np.concatenate([export.run(sess, images[i:i + 256])["probabilities"]
                                        for i in range(0, len(images), 256)]).argmax(-1)
  sample = np.sort(np.random.default_rng(0).choice(len(images), 256, replace=False))
  agreement = np.mean(predictions["fp32"][sample] == predictions["int8"][sample])
  accuracy = {k: float(np.mean(v == labels)) for k, v in predictions.items()}
  print(f"int8 top-1 agreement {agreement:.3f}; PrivateTest accuracy {accuracy}")
  assert agreement >= 0.9
  assert accuracy["fp32"] - accuracy["int8"] <= 0.02
