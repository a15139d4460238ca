"""Test-time flip averaging: a numpy reference and mirror invariance."""
import jax
import numpy as np
import pytest

from fer_jax import evaluate


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
  log_probs, va = jax.jit(evaluate.flip_averaged(_linear_forward))(variables, images)
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
  averaged = jax.jit(evaluate.flip_averaged(_linear_forward))
  np.testing.assert_allclose(averaged(variables, images)[0],
                             averaged(variables, images[:, :, ::-1])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, named", [
    (["--model=/absent/model"], "/absent/model"),
    (["--model=fer2013-student", "--data=nope"], "data='nope'"),
    # AffectNet has no download to build from: the preset's data_dir (under an empty
    # HOME here) holds no built copy.
    (["--model=fer2013-student", "--data=affectnet"], "'affectnet' is not built at"),
])
def test_cli_bad_input_is_one_line_and_exit_status_2(args, named, tmp_path):
  import os, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  done = subprocess.run([sys.executable, "-m", "fer_jax.evaluate", *args],
                        capture_output=True, text=True, check=False,
                        env={**os.environ, "HOME": str(tmp_path)})
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and named in lines[0], done.stderr
