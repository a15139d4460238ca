"""fer_jax.predict: photos and videos in, one row per face out.

The model is a small ResNet-18 (width 4) with random weights whose output
layer is rescaled so that its logits have zero mean and unit-ish spread over
FER2013 training faces: untrained, but its labels vary from face to face, so
"the CLI's label equals the model's prediction on the crop" is not satisfied
by a model that always says the same class. The crops the model is checked
against are computed here with our own numpy code from the boxes the CLI
reports (detected or given), following the preprocessing documented in the
module: square about the box's centre, edge padding, ITU-R 601 luma, bilinear
resize to 48x48.
"""
import argparse
import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import faces as scenes
from helpers import mtcnn_weights
import fer_jax
from fer_jax import model_dir
from fer_jax import predict
from fer_jax.data.classes import FER7

REPO = pathlib.Path(__file__).resolve().parents[1]
MIN_IOU = 0.5
# Random features of an untrained net are nearly collinear, so most seeds give the three
# pasted faces one label; with this seed (jax 0.10 threefry) they get three.
MODEL_SEED = 5
VIDEO_SHAPE = (240, 320)
VIDEO_FRAMES, VIDEO_FPS = 24, 12
# (PublicTest index, centre at frame t, side): two faces crossing a 320x240 frame.
# Face 13 is missed at some places on this path at 96 px; 2 and 30 are found on every frame.
VIDEO_FACES = ((2, lambda t: (75 + 3 * t, 80), 96), (30, lambda t: (240, 150 - t), 96))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mtcnn_env(tmp_path_factory):
  """FER_JAX_CACHE with the detector weights converted into a temporary folder."""
  cache = tmp_path_factory.mktemp("fer_jax_cache")
  mtcnn_weights(cache)
  return {"FER_JAX_CACHE": str(cache)}


@pytest.fixture(autouse=True)
def _detector_cache(request, monkeypatch):
  """In-process tests read the converted weights too (never the home directory)."""
  if "mtcnn_env" in request.fixturenames:
    for key, value in request.getfixturevalue("mtcnn_env").items():
      monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  """A saved model directory: tiny random ResNet-18, output layer standardised."""
  calibration = scenes.public_test_faces(range(100, 228))  # not the faces pasted below
  spec = dict(model="resnet18", model_kwargs=dict(stem="small", width=4), class_names=FER7,
              image_shape=(48, 48, 1), input_shape=(48, 48, 1))
  module = model_dir.TrainedModel(variables=None, **spec).module()
  inputs = jnp.zeros((1, 48, 48, 1))
  variables = jax.jit(lambda: module.init(jax.random.key(MODEL_SEED), inputs, train=False))()
  model = model_dir.TrainedModel(variables=variables, **spec)
  logits, _ = jax.jit(model.apply)(np.stack(calibration)[..., None])
  mean, scale = np.mean(logits, 0), 2.0 / np.std(logits, 0)
  head = variables["params"]["Heads_0"]["classifier"]
  head = {"kernel": head["kernel"] * scale, "bias": (head["bias"] - mean) * scale}
  params = {**variables["params"], "Heads_0": {"classifier": head}}
  model = model_dir.TrainedModel(variables={**variables, "params": params}, **spec)
  return model.save(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def model(model_path):
  loaded = model_dir.load(model_path)
  apply = jax.jit(loaded.apply)
  return loaded, lambda crops: jax.nn.softmax(apply(np.asarray(crops, np.uint8))[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  """The three-face scene of tests/test_detect.py as a PNG; (path, image, boxes)."""
  faces48 = scenes.public_test_faces([index for index, *_ in scenes.FACES])
  image, boxes = scenes.scene(faces48, [placement for _, *placement in scenes.FACES])
  path = tmp_path_factory.mktemp("photo") / "three_faces.png"
  Image.fromarray(image).save(path)
  return path, image, boxes


def video_frames():
  """The moving two-face video's frames and the pasted boxes per frame."""
  faces48 = scenes.public_test_faces([index for index, *_ in VIDEO_FACES])
  frames, boxes = [], []
  for t in range(VIDEO_FRAMES):
    placements = [(centre(t), side, 0) for _, centre, side in VIDEO_FACES]
    frame, frame_boxes = scenes.scene(faces48, placements, VIDEO_SHAPE, seed=1)
    frames.append(frame)
    boxes.append(frame_boxes)
  return frames, boxes


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  """An MPEG-4 Part 2 video written with PyAV; (path, pasted boxes per frame)."""
  av = pytest.importorskip("av", reason="PyAV (the 'av' package) is needed for video")
  frames, boxes = video_frames()
  path = tmp_path_factory.mktemp("video") / "two_faces.mp4"
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
    stream.width, stream.height, stream.pix_fmt = VIDEO_SHAPE[1], VIDEO_SHAPE[0], "yuv420p"
    stream.bit_rate = 2_000_000
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return path, boxes


# ------------------------------------------------------ independent checks


def our_crop(image_rgb, box, side=48):
  """The documented preprocessing, written again: square, edge pad, luma, resize."""
  x0, y0, x1, y1 = box
  size = max(1, int(round(max(x1 - x0, y1 - y0))))
  left = int(round((x0 + x1) / 2 - size / 2))
  top = int(round((y0 + y1) / 2 - size / 2))
  h, w = image_rgb.shape[:2]
  rows = np.clip(np.arange(top, top + size), 0, h - 1)
  cols = np.clip(np.arange(left, left + size), 0, w - 1)
  square = image_rgb[rows][:, cols].astype(np.float64)
  grey = np.round(square @ [0.299, 0.587, 0.114]).astype(np.uint8)
  return np.asarray(Image.fromarray(grey).resize((side, side), Image.BILINEAR))[..., None]


def assert_rows_match_model(rows, image_rgb, classify):
  """Labels equal the model's argmax on our own crops of the reported boxes."""
  crops = np.stack([our_crop(image_rgb, row["box"]) for row in rows])
  want = np.asarray(classify(crops))
  got = np.array([[row["probabilities"][c] for c in FER7] for row in rows])
  np.testing.assert_allclose(got, want, atol=2e-3)
  assert [row["label"] for row in rows] == [FER7[k] for k in np.argmax(want, -1)]


def assert_all_found(rows, expected_boxes):
  ious = [max([scenes.iou(row["box"], box) for row in rows], default=0.0)
          for box in expected_boxes]
  assert min(ious) >= MIN_IOU, (ious, [row["box"] for row in rows])


def run_cli(*args, env=None, timeout=300):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", "fer_jax.predict", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def stderr_lines(capsys):
  return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------- helpers


def test_bucket_square_and_crop():
  assert [predict.bucket(n) for n in (0, 1, 8, 9, 200, 257)] == [8, 8, 8, 16, 256, 512]
  assert predict.square_box((10, 20, 30, 60)) == (0, 20, 40)
  image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
  crop = predict.crop_square(image, (-2, -1, 3, 4))  # off the top-left corner
  assert crop.shape == (5, 5, 3)
  # One row above and two columns left of the image: copies of its corner pixel.
  np.testing.assert_array_equal(crop[:2, :3], np.broadcast_to(image[0, 0], (2, 3, 3)))
  np.testing.assert_array_equal(crop[1:, 2:], image[:4, :3])
  for box in ((-2, -1, 3, 4), (3.4, 1.2, 9.7, 6.1), (0, 0, 6, 5)):
    np.testing.assert_array_equal(predict.face_crop(image, box, (48, 48, 1)),
                                  our_crop(image, box))


def test_moving_average_skips_missing_frames():
  values = np.array([[0.0], [np.nan], [1.0], [1.0], [np.nan], [np.nan], [np.nan]])
  smoothed = predict.moving_average(values, 3)[:, 0]
  np.testing.assert_allclose(smoothed[:5], [0.0, 0.5, 1.0, 1.0, 1.0])
  assert np.isnan(smoothed[5:]).all()
  assert [predict.smooth_window(rate, 1.0) for rate in (6, 12, 12.4, 0.1)] == [7, 13, 13, 1]
  probs = np.array([[0.1, 0.9], [0.7, 0.3]])
  np.testing.assert_allclose(predict.engagement_proxy(probs, ("happy", "Neutral")), [0.1, 0.7])
  assert predict.engagement_proxy(probs, ("a", "b")) is None


# --------------------------------------------------------------- library


def test_same_bucket_does_not_recompile(model_path):
  predictor = fer_jax.load(model_path)
  crops = np.zeros((9, 48, 48, 1), np.uint8)
  for n in (1, 3, 8):
    assert predictor.classify(crops[:n])[0].shape == (n, 7)
  assert predictor.traces == 1 and predictor._forward._cache_size() == 1
  predictor.classify(crops)  # 9 faces: the next bucket, one more program
  assert predictor.traces == 2


def test_predict_inputs_boxes_and_no_detect(model_path, model, photo):
  path, image, boxes = photo
  _, classify = model
  predictor = fer_jax.load(model_path)
  face48 = scenes.public_test_faces([5])[0]
  want = np.asarray(classify(face48[None, ..., None]))[0]
  for crop in (face48, face48[..., None], np.repeat(face48[..., None], 3, -1)):
    (face,), = predictor.predict(crop, detect=False)
    assert face.box == (0.0, 0.0, 48.0, 48.0) and face.score == 1.0
    np.testing.assert_allclose(list(face.probabilities.values()), want, atol=1e-5)
    assert face.label == FER7[int(np.argmax(want))] and face.valence is None
  given = predictor.predict([path, image], boxes=[boxes, boxes[:1]])
  assert [len(f) for f in given] == [3, 1]
  assert given[0][0] == given[1][0] and given[0][0].box == tuple(boxes[0])
  assert_rows_match_model([dataclasses.asdict(f) for f in given[0]], image, classify)


def test_load_by_name_and_bad_names(model_path, monkeypatch, tmp_path):
  (tmp_path / "pretrained").mkdir()
  model_dir.load(model_path).save(tmp_path / "pretrained" / "tiny-fer")
  monkeypatch.setattr(model_dir, "pretrained_dir", lambda: tmp_path / "pretrained")
  assert fer_jax.load("tiny-fer").class_names == FER7
  with pytest.raises(model_dir.ModelDirError, match=r"no-such: neither a model directory nor "
                                                    r"a shipped model name \(shipped: "
                                                    r"tiny-fer\)"):
    fer_jax.load("no-such")


# ------------------------------------------------------------------- CLI


def test_cli_finds_every_pasted_face_and_labels_are_the_models(mtcnn_env, model_path, model,
                                                                photo, tmp_path):
  path, image, boxes = photo
  proc = run_cli(path, f"--model={model_path}", f"--annotate={tmp_path}", env=mtcnn_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(rows) == 3 and {r["file"] for r in rows} == {str(path)}
  assert all(r["frame"] is None and r["score"] > 0.9 for r in rows)
  assert_all_found(rows, boxes)
  assert_rows_match_model(rows, image, model[1])
  labels = [r["label"] for r in rows]
  assert len(set(labels)) >= 2, f"{labels}: choose a MODEL_SEED whose labels differ"
  drawn = np.asarray(Image.open(tmp_path / f"{pathlib.Path(path).stem}.png"))
  assert drawn.shape == image.shape
  for r in rows:  # the box outline is drawn; the face inside it is not painted over
    x0, y0, x1, y1 = (int(round(v)) for v in r["box"])
    np.testing.assert_array_equal(drawn[(y0 + y1) // 2, x0], (255, 215, 0))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    np.testing.assert_array_equal(drawn[cy, cx], image[cy, cx])


def test_cli_video_rows_and_timeline(mtcnn_env, model_path, model, video, tmp_path):
  path, boxes = video
  out, png = tmp_path / "rows.jsonl", tmp_path / "timeline.png"
  status = predict.main([str(path), f"--model={model_path}", "--every=2",
                         f"--timeline={png}", f"--out={out}"])
  assert status == 0
  rows = read_jsonl(out)
  frames = sorted({r["frame"] for r in rows})
  assert frames == list(range(0, VIDEO_FRAMES, 2))
  for frame in frames:
    here = [r for r in rows if r["frame"] == frame]
    assert len(here) == 2
    assert here[0]["time_s"] == pytest.approx(frame / VIDEO_FPS, abs=1e-3)
    assert_all_found(here, boxes[frame])
  assert png.stat().st_size > 10_000 and Image.open(png).size[0] > 500
  # Detecting every 3rd sampled frame: same frames, boxes held in between.
  out_csv = tmp_path / "rows.csv"
  assert predict.main([str(path), f"--model={model_path}", "--every=2", "--detect_every=3",
                       f"--out={out_csv}"]) == 0
  with open(out_csv, newline="") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows) and "p_neutral" in table[0]
  held = [r for r in table if int(r["frame"]) in (2, 4)]
  first = [r for r in table if r["frame"] == "0"]
  assert sorted(r["x0"] for r in held[:2]) == sorted(r["x0"] for r in first)
  # Own boxes for two frames (the frame column): only those frames, those boxes.
  given = tmp_path / "boxes.csv"
  given.write_text("file,frame,x0,y0,x1,y1\n" + "".join(
      f"{path.name},{frame},{','.join(map(str, boxes[frame][0]))}\n" for frame in (0, 4)))
  out_given = tmp_path / "given.jsonl"
  assert predict.main([str(path), f"--model={model_path}", "--every=2", f"--boxes={given}",
                       f"--out={out_given}"]) == 0
  rows = read_jsonl(out_given)
  assert [(r["frame"], tuple(r["box"]), r["score"]) for r in rows] == [
      (frame, tuple(boxes[frame][0]), 1.0) for frame in (0, 4)]


def test_video_benchmark_times_the_cli_video_path(mtcnn_env, model_path, video, monkeypatch):
  """experiments/benchmarks/predict_video.py drives predict's own video path; it broke
  once unnoticed when ``Run`` changed, so its timing function runs here on the test video."""
  monkeypatch.syspath_prepend(str(REPO / "experiments" / "benchmarks"))
  import predict_video  # pylint: disable=import-outside-toplevel
  options = argparse.Namespace(frames=VIDEO_FRAMES, min_face_size=40, max_side=640, batch=8)
  timed = predict_video.time_cli(video[0], str(model_path), 3, options)
  assert timed["face_rows"] == 2 * VIDEO_FRAMES and timed["bad_inputs"] == 0


def test_cli_boxes_and_no_detect(model_path, model, photo, tmp_path, capsys):
  path, image, boxes = photo
  _, classify = model
  table = tmp_path / "boxes.csv"
  lines = ["file,x0,y0,x1,y1"] + [f"{path.name},{','.join(map(str, b))}" for b in boxes]
  table.write_text("\n".join(lines) + "\n")
  out = tmp_path / "given.jsonl"
  assert predict.main([str(path), f"--model={model_path}", f"--boxes={table}",
                       f"--out={out}"]) == 0
  rows = read_jsonl(out)
  assert [tuple(r["box"]) for r in rows] == [tuple(b) for b in boxes]
  assert all(r["score"] == 1.0 for r in rows)
  assert_rows_match_model(rows, image, classify)
  face48 = scenes.public_test_faces([5])[0]
  Image.fromarray(face48).save(tmp_path / "crop.png")
  assert predict.main([str(tmp_path / "crop.png"), f"--model={model_path}",
                       "--no-detect"]) == 0
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert row["box"] == [0, 0, 48, 48]
  want = np.asarray(classify(face48[None, ..., None]))[0]
  np.testing.assert_allclose([row["probabilities"][c] for c in FER7], want, atol=2e-6)


def test_flip_averages_each_face_with_its_mirror_image(model_path, model, tmp_path, capsys):
  _, classify = model
  face48 = scenes.public_test_faces([5])[0]
  views = np.asarray(classify(np.stack([face48, face48[:, ::-1]])[..., None]))
  assert np.abs(views[0] - views[1]).max() > 1e-3  # the model is not mirror symmetric
  for name, crop in (("crop.png", face48), ("mirrored.png", face48[:, ::-1])):
    Image.fromarray(crop).save(tmp_path / name)
  assert predict.main([str(tmp_path / "crop.png"), str(tmp_path / "mirrored.png"),
                       f"--model={model_path}", "--no-detect", "--flip"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(rows) == 2
  for row in rows:
    np.testing.assert_allclose([row["probabilities"][c] for c in FER7], views.mean(0),
                               atol=2e-6)


def test_bad_inputs_get_one_line_each_and_the_rest_is_processed(mtcnn_env, model_path, photo,
                                                                tmp_path, capsys):
  path, _, _ = photo
  folder = tmp_path / "photos"
  (folder / "sub").mkdir(parents=True)
  (folder / "sub" / "good.png").write_bytes(path.read_bytes())
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  (folder / "notes.txt").write_text("skipped: not an image extension")
  Image.fromarray(scenes.background((120, 160))).save(folder / "empty.png")
  (tmp_path / "clip.mp4").write_bytes(b"\x00" * 1000)
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "notes.txt").write_text("a folder of no image or video")
  status = predict.main([str(folder), str(tmp_path / "clip.mp4"), str(tmp_path / "missing.png"),
                         str(tmp_path / "texts"), f"--model={model_path}"])
  captured = capsys.readouterr()
  errors = captured.err.strip().splitlines()
  assert status == 2
  assert len(errors) == 5, errors
  expected = {"broken.jpg": "not a readable image", "empty.png": "no face found",
              "clip.mp4": "not a readable video", "missing.png": "no such file",
              "texts": "no image or video in this folder"}
  for name, what in expected.items():
    (line,) = [e for e in errors if name in e]
    assert what in line, line
  rows = [json.loads(line) for line in captured.out.splitlines()]
  assert len(rows) == 3 and {r["file"] for r in rows} == {str(folder / "sub" / "good.png")}
  # Usable inputs without a face are not bad input: status 1.
  assert predict.main([str(folder / "empty.png"), str(folder / "sub" / "good.png"),
                       f"--model={model_path}"]) == 1
  assert "empty.png: no face found" in capsys.readouterr().err


def test_model_of_another_format_version_exits_2(model_path, photo, tmp_path, capsys):
  other = model_dir.load(model_path).save(tmp_path / "v99")
  spec = json.loads((other / "model.json").read_text())
  (other / "model.json").write_text(json.dumps(dict(spec, format_version=99)))
  assert predict.main([str(photo[0]), f"--model={other}"]) == 2
  (line,) = stderr_lines(capsys)
  assert "model format version 99" in line and "reads version 1" in line
  assert predict.main([str(photo[0]), "--model=no-such-model"]) == 2
  (line,) = stderr_lines(capsys)
  assert "--model=no-such-model: " in line and "shipped model name" in line


@pytest.mark.parametrize("row,where", [
    ("a.png,1,2,x,4", "line 3, field x1: expected a number, got 'x'"),
    ("a.png,1,2,3", "line 3, field y1: expected a number, got ''"),
    ("a.png,5,2,3,4", "line 3, field x1: expected x1 > x0"),
    (",1,2,3,4", "line 3, field file"),
])
def test_bad_boxes_rows_name_line_and_field(model_path, photo, tmp_path, capsys, row, where):
  table = tmp_path / "boxes.csv"
  table.write_text(f"file,x0,y0,x1,y1\na.png,1,2,3,4\n{row}\n")
  assert predict.main([str(photo[0]), f"--model={model_path}", f"--boxes={table}"]) == 2
  (line,) = stderr_lines(capsys)
  assert str(table) in line and where in line, line


def test_timeline_without_matplotlib_is_one_line(model_path, photo, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
  assert predict.main([str(photo[0]), f"--model={model_path}", "--timeline=t.png"]) == 2
  (line,) = stderr_lines(capsys)
  assert "--timeline needs matplotlib" in line


def test_valence_arousal_of_a_model_with_a_va_head(tmp_path, capsys):
  spec = dict(model="resnet18", model_kwargs=dict(stem="small", width=4, num_va=2),
              class_names=FER7, image_shape=(48, 48, 1), input_shape=(48, 48, 1), num_va=2)
  module = model_dir.TrainedModel(variables=None, **spec).module()
  inputs = jnp.zeros((1, 48, 48, 1))
  variables = jax.jit(lambda: module.init(jax.random.key(0), inputs, train=False))()
  model = model_dir.TrainedModel(variables=variables, **spec)
  face48 = scenes.public_test_faces([5])[0]
  _, want = jax.jit(model.apply)(face48[None, ..., None])
  Image.fromarray(face48).save(tmp_path / "crop.png")
  assert predict.main([str(tmp_path / "crop.png"), f"--model={model.save(tmp_path / 'va')}",
                       "--no-detect"]) == 0
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  np.testing.assert_allclose([row["valence"], row["arousal"]], np.asarray(want)[0], atol=1e-5)
