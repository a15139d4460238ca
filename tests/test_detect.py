"""Tests of the MTCNN face detector (fer_jax.detect).

The network checks rebuild P-Net, R-Net and O-Net in plain numpy from the
Keras layer list of mtcnn 1.0.0 and its weight arrays as stored (HWIO kernels,
Keras flatten order), so they pin the weight mapping, the PReLU placement,
TF's pooling padding and the flatten order. The image-op checks compare with
loop-by-loop numpy versions of TF's AREA resize and crop_and_resize. The
end-to-end checks paste FER2013 faces onto a textured background.

The weights come from the installed ``mtcnn`` wheel, converted into a
temporary directory (nothing is written under the home directory).
"""
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

import faces as scenes
from helpers import mtcnn_weights
from fer_jax.detect import mtcnn
from fer_jax.detect import MTCNN

CANVAS = (480, 640)
# Each face is found when pasted alone here; about one in five of the first 40
# PublicTest faces is not (tight crops, low contrast).
FACES = scenes.FACES
MIN_IOU = 0.5


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  return mtcnn_weights(tmp_path_factory.mktemp("mtcnn"))


@pytest.fixture(scope="module")
def arrays(weights_file):
  return mtcnn.load_weight_arrays(weights_file)


@pytest.fixture(scope="module")
def detector(weights_file):
  return MTCNN(weights_file=weights_file)


# ------------------------------------------------------- numpy reference


def np_conv(x, kernel, bias):
  """'valid' NHWC convolution with an HWIO kernel."""
  kh, kw = kernel.shape[:2]
  # [N, h, w, C, kh, kw]
  windows = sliding_window_view(x, (kh, kw), axis=(1, 2))
  return np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias


def np_prelu(x, alpha):
  return np.where(x >= 0, x, alpha.reshape(-1) * x)


def np_max_pool(x, k, stride, same):
  """TF max-pooling; 'same' pads the extra row/column at the bottom/right."""
  if same:
    pads = []
    for n in x.shape[1:3]:
      total = max((-(-n // stride) - 1) * stride + k - n, 0)
      pads.append((total // 2, total - total // 2))
    x = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-np.inf)
  windows = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
  return windows.max(axis=(-2, -1))


def np_softmax_face(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True))[..., 1]


def np_conv_stack(x, arrays, pools):
  """Keras conv blocks: conv, PReLU, then the block's pooling (or none)."""
  for pool in pools:
    x = np_prelu(np_conv(x, arrays.pop(0), arrays.pop(0)), arrays.pop(0))
    if pool:
      x = np_max_pool(x, *pool)
  return x


def np_dense_head(x, arrays, num_heads):
  """Permute((2, 1, 3)) + Flatten, Dense + PReLU, then the output Denses."""
  x = x.transpose(0, 2, 1, 3).reshape(len(x), -1)
  x = np_prelu(x @ arrays.pop(0) + arrays.pop(0), arrays.pop(0))
  return [x @ arrays.pop(0) + arrays.pop(0) for _ in range(num_heads)]


def np_pnet(arrays, x):
  arrays = [a.astype(np.float64) for a in arrays]
  x = np_conv_stack(x, arrays, [(2, 2, True), None, None])
  reg = np_conv(x, arrays.pop(0), arrays.pop(0))
  return reg, np_softmax_face(np_conv(x, arrays.pop(0), arrays.pop(0)))


def np_rnet(arrays, x):
  arrays = [a.astype(np.float64) for a in arrays]
  x = np_conv_stack(x, arrays, [(3, 2, True), (3, 2, False), None])
  reg, logits = np_dense_head(x, arrays, 2)
  return reg, np_softmax_face(logits)


def np_onet(arrays, x):
  arrays = [a.astype(np.float64) for a in arrays]
  pools = [(3, 2, True), (3, 2, False), (2, 2, True), None]
  x = np_conv_stack(x, arrays, pools)
  reg, landmarks, logits = np_dense_head(x, arrays, 3)
  return reg, landmarks, np_softmax_face(logits)


REFERENCES = {"pnet": (np_pnet, (2, 29, 38, 3)),
              "rnet": (np_rnet, (3, 24, 24, 3)),
              "onet": (np_onet, (3, 48, 48, 3))}


def test_weights_convert_without_importing_mtcnn(weights_file, arrays):
  with np.load(weights_file, allow_pickle=False) as data:
    assert len(data.files) == 13 + 16 + 21
  total = sum(a.size for net in mtcnn.NETS for a in arrays[net])
  assert total == 495_850
  # The package's top level imports TensorFlow; we read its files only.
  assert "mtcnn" not in sys.modules and "tensorflow" not in sys.modules


def test_cache_follows_env_and_is_written_once(weights_file, tmp_path,
                                               monkeypatch):
  monkeypatch.setenv("FER_JAX_CACHE", str(tmp_path / "cache"))
  target = mtcnn.cache_file()
  assert target == tmp_path / "cache" / "mtcnn-1.0.0.npz"
  first = mtcnn.load_weight_arrays()  # converts
  stamp = target.stat().st_mtime_ns
  again = mtcnn.load_weight_arrays()  # reads
  assert target.stat().st_mtime_ns == stamp
  assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp
  for net in mtcnn.NETS:
    for a, b in zip(first[net], again[net]):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("net", mtcnn.NETS)
def test_network_matches_numpy_reference(arrays, net):
  reference, shape = REFERENCES[net]
  x = np.random.default_rng(0).uniform(-1, 1, shape)
  variables = mtcnn.to_variables(net, arrays[net])
  ours = mtcnn.MODULES[net].apply(variables, jnp.asarray(x, jnp.float32))
  theirs = reference(arrays[net], x)
  assert ours[0].shape == theirs[0].shape
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=0)


# ------------------------------------------------------------ image ops


def np_tf_area_resize(image, out_h, out_w):
  """TF's resize_area_op, pixel by pixel: overlap-weighted mean."""
  in_h, in_w = image.shape[:2]
  sy, sx = in_h / out_h, in_w / out_w

  def weights(k, s, n):
    lo, hi = k * s, (k + 1) * s
    return {i: min(i + 1, hi) - max(i, lo)
            for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), n))}

  out = np.zeros((out_h, out_w, image.shape[2]))
  for y in range(out_h):
    for x in range(out_w):
      for i, wy in weights(y, sy, in_h).items():
        for j, wx in weights(x, sx, in_w).items():
          out[y, x] += wy * wx * image[i, j]
  return out / (sy * sx)


@pytest.mark.parametrize("in_shape,out_shape", [
    ((37, 53), (16, 23)), ((37, 53), (12, 60)), ((36, 52), (18, 13))])
def test_area_resize_matches_tf_semantics(in_shape, out_shape):
  image = np.random.default_rng(1).integers(0, 256, (*in_shape, 3), np.uint8)
  ours = mtcnn.area_resize(jnp.asarray(image[None], jnp.float32), out_shape)
  # 1/256 of a grey level is the fixed-point step of the second axis.
  np.testing.assert_allclose(np.asarray(ours[0]), np_tf_area_resize(
      image.astype(np.float64), *out_shape), atol=4e-3)


def np_tf_crop_and_resize(image, box, side):
  """TF's CropAndResize, bilinear, extrapolation 0, for one normalised box."""
  h, w = image.shape[:2]
  y1, x1, y2, x2 = box
  out = np.zeros((side, side, image.shape[2]))
  for i in range(side):
    y = y1 * (h - 1) + i * (y2 - y1) * (h - 1) / (side - 1)
    for j in range(side):
      x = x1 * (w - 1) + j * (x2 - x1) * (w - 1) / (side - 1)
      if not (0 <= y <= h - 1 and 0 <= x <= w - 1):
        continue
      t, b = int(np.floor(y)), int(np.ceil(y))
      l, r = int(np.floor(x)), int(np.ceil(x))
      top = image[t, l] + (image[t, r] - image[t, l]) * (x - l)
      bottom = image[b, l] + (image[b, r] - image[b, l]) * (x - l)
      out[i, j] = top + (bottom - top) * (y - t)
  return out


def test_crop_and_resize_matches_tf_semantics():
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (2, 30, 41, 3)).astype(np.float32)
  boxes = np.array([[0.1, 0.2, 0.7, 0.6], [-0.2, 0.5, 0.5, 1.3],
                    [0.3, -0.1, 0.9, 0.4]], np.float32)  # two cross the border
  frame = np.array([0, 1, 1], np.int32)
  ours = mtcnn.crop_and_resize(jnp.asarray(images), jnp.asarray(boxes),
                               jnp.asarray(frame), 24)
  for k in range(3):
    np.testing.assert_allclose(
        np.asarray(ours[k]),
        np_tf_crop_and_resize(images[frame[k]].astype(np.float64),
                              boxes[k], 24),
        atol=1e-5)


# ----------------------------------------------------------------- boxes


def test_matrix_nms_drops_chains_like_mtcnn():
  # b overlaps a, c overlaps b but not a: greedy NMS would keep c, mtcnn's
  # matrix NMS drops it because b (though dropped) scored higher.
  boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [7, 0, 17, 10],
                    [40, 40, 50, 50]], np.float64)
  np.testing.assert_array_equal(mtcnn.matrix_nms(boxes, 0.3), [0, 3])


def test_matrix_nms_chunks_agree():
  rng = np.random.default_rng(3)
  corner = rng.uniform(0, 100, (300, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(5, 30, (300, 2))], 1)
  np.testing.assert_array_equal(mtcnn.matrix_nms(boxes, 0.5),
                                mtcnn.matrix_nms(boxes, 0.5, chunk=7))


def test_bucket_is_a_power_of_two():
  sizes = [mtcnn.bucket(n) for n in (0, 1, 4, 5, 64, 65)]
  assert sizes == [4, 4, 4, 8, 64, 128]


# -------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fer_faces():
  return scenes.public_test_faces([index for index, *_ in FACES])


@pytest.fixture(scope="module")
def scene(fer_faces):
  """The background, each face pasted alone, and all three together."""
  empty = scenes.background(CANVAS)
  alone, boxes = [], []
  canvas = empty
  for face, (_, centre, side, degrees) in zip(fer_faces, FACES):
    alone.append(scenes.paste(empty, face, centre, side, degrees)[0])
    canvas, box = scenes.paste(canvas, face, centre, side, degrees)
    boxes.append(box)
  return empty, alone, canvas, boxes


def assert_found(faces, expected_boxes):
  """Every expected box matched at IoU >= MIN_IOU; every confident detection
  (score >= 0.9) lies on an expected box. Returns the IoUs."""
  ious = [max([scenes.iou(f["box"], box) for f in faces], default=0.0)
          for box in expected_boxes]
  assert min(ious) >= MIN_IOU, (ious, faces)
  stray = [f for f in faces if f["score"] >= 0.9
           and max(scenes.iou(f["box"], box) for box in expected_boxes) < 0.3]
  assert not stray, stray
  return ious


def test_each_face_found_alone(detector, scene):
  _, alone, _, boxes = scene
  for image, box in zip(alone, boxes):
    faces = detector(image)
    assert_found(faces, [box])
    f = faces[0]
    assert f["landmarks"].shape == (5, 2)
    # Eyes above the mouth, left eye left of the right one, all in the box.
    (lx, ly), (rx, ry), _, (mlx, mly), _ = f["landmarks"]
    assert lx < rx and max(ly, ry) < mly
    x0, y0, x1, y1 = f["box"]
    assert np.all((f["landmarks"] >= (x0, y0)) & (f["landmarks"] <= (x1, y1)))


def test_three_faces_found_together(detector, scene):
  _, _, canvas, boxes = scene
  ious = assert_found(detector(canvas), boxes)
  print("IoU with the pasted squares:", [round(v, 3) for v in ious])


def test_background_and_grey_images(detector, scene):
  empty, _, canvas, boxes = scene
  assert detector(empty) == []
  grey = np.asarray(Image.fromarray(canvas).convert("L"))
  faces_2d, faces_3d = detector(grey), detector(grey[..., None])
  assert_found(faces_2d, boxes)
  assert [f["box"] for f in faces_2d] == [f["box"] for f in faces_3d]


def test_same_frame_size_does_not_recompile(detector, scene):
  empty, alone, canvas, _ = scene
  detector(canvas)
  before = dict(mtcnn.TRACE_COUNTS)
  detector(canvas)
  detector(empty)
  assert dict(mtcnn.TRACE_COUNTS) == before
  # Candidate counts vary with content; P-Net's program depends on size only.
  detector(alone[0])
  assert mtcnn.TRACE_COUNTS["pnet"] == before["pnet"]


def test_detect_batch_matches_single_frames(detector, scene):
  empty, alone, canvas, _ = scene
  batch = detector.detect_batch(np.stack([canvas, empty, alone[1]]))
  assert len(batch) == 3 and batch[1] == []
  for got, image in zip(batch, (canvas, empty, alone[1])):
    want = detector(image)
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g["box"], w["box"], atol=0.05)
      np.testing.assert_allclose(g["landmarks"], w["landmarks"], atol=0.05)


def test_max_side_maps_boxes_back(weights_file, scene):
  _, _, canvas, boxes = scene
  small = MTCNN(min_face_size=60, max_side=320, weights_file=weights_file)
  assert small.plan(CANVAS).work_shape == (240, 320)
  assert_found(small(canvas), boxes)
