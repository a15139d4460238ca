"""Test-time flip averaging: a numpy reference and mirror invariance; the command line."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fer_jax import model_dir
import fixtures  # tests/fixtures.py, on the path as a sibling test module


def _linear_forward(variables, images):
  """Logits linear in the pixels (not mirror symmetric), and a 2-wide V/A output."""
  flat = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
  return flat @ variables["w"], flat[:, :2]


@pytest.fixture
def faces_and_weights():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 6, 4, 1), dtype=np.uint8)
  return images, {"w": rng.normal(size=(24, 7)).astype(np.float32)}


def test_flip_averaging_is_the_mean_of_both_views_probabilities(faces_and_weights):
  images, variables = faces_and_weights
  log_probs, va = jax.jit(model_dir.flip_averaged(_linear_forward))(variables, images)
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  mirrored = images[:, :, ::-1]
  views = [np.asarray(_linear_forward(variables, x)[0]) for x in (images, mirrored)]
  np.testing.assert_allclose(np.exp(log_probs), (softmax(views[0]) + softmax(views[1])) / 2,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      va, (_linear_forward(variables, images)[1] + _linear_forward(variables, mirrored)[1]) / 2,
      rtol=1e-6)
  assert not np.allclose(views[0], views[1])  # the reference is not trivially symmetric


def test_flip_averaged_predictions_do_not_change_when_the_face_is_mirrored(faces_and_weights):
  images, variables = faces_and_weights
  averaged = jax.jit(model_dir.flip_averaged(_linear_forward))
  np.testing.assert_allclose(averaged(variables, images)[0],
                             averaged(variables, images[:, :, ::-1])[0], rtol=1e-5, atol=1e-6)


def _run_evaluate(tmp_path, *args):
  """The CLI with HOME (so ~/tensorflow_datasets) at tmp_path, run from tmp_path/work: the
  presets' downloads (../shared/data) are then under tmp_path/shared/data."""
  (tmp_path / "work").mkdir(exist_ok=True)
  return subprocess.run([sys.executable, "-m", "fer_jax.evaluate", *args],
                        capture_output=True, text=True, check=False, cwd=tmp_path / "work",
                        env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.parametrize("args, named", [
    (["--model=/absent/model"], "/absent/model"),
    (["--model=fer2013-student", "--data=nope"], "data='nope'"),
    # AffectNet has no download to build from: the preset's data_dir (under an empty
    # HOME here) holds no built copy.
    (["--model=fer2013-student", "--data=affectnet"], "'affectnet' is not built at"),
])
def test_cli_bad_input_is_one_line_and_exit_status_2(args, named, tmp_path):
  done = _run_evaluate(tmp_path, *args)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and named in lines[0], done.stderr


def test_cli_malformed_download_is_one_line_naming_file_row_and_field(tmp_path):
  csv_path = fixtures.write_fer2013_csv_with(tmp_path / "shared/data/fer2013", 3, "emotion", "9")
  done = _run_evaluate(tmp_path, "--model=fer2013-student")
  assert done.returncode == 2, done.stderr[-2000:]
  # The build's notice comes first; the error is one line and the last.
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), done.stderr
  assert "line 3: unknown label 9" in errors[0] and csv_path.name in errors[0]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "tensorflow_datasets").exists()


def test_cli_stdout_is_the_json_alone_when_the_dataset_is_built_on_first_use(tmp_path):
  fixtures.write_fer2013_csv(tmp_path / "shared/data/fer2013", fixtures.fer2013_rows())
  done = _run_evaluate(tmp_path, "--model=fer2013-student")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "Downloading and preparing" in done.stderr  # the build happened, on stderr
  results = json.loads(done.stdout)
  assert {"public_test/accuracy", "private_test/accuracy", "private_test/flip_accuracy",
          "private_test_occluded/accuracy"} <= set(results)
  assert round(results["private_test/accuracy"] * 3, 6) in (0, 1, 2, 3)  # 3 PrivateTest faces
