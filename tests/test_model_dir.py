"""A trained model directory: written by training, loaded anywhere, atomic, versioned."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import numpy as np
import pytest

from fer_jax import checkpoint
from fer_jax import config_utils as cu
from fer_jax import model_dir
from fer_jax import train
from helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_main(*args, cwd):
  # The test process's XLA flags and compilation cache (conftest.py): the tiny
  # config's programs are then those the in-process tests compiled.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
  return subprocess.run([sys.executable, "-m", "fer_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


# (config argument, its name, the teacher's model, its data). The default run trains
# the tests' tiny config; the slow one the AFNet teacher of the main job's smoke run.
RUNS = {
    "tiny": ("tests/tiny_config_file.py:teacher_only", "tiny", "resnet18", tiny_config().data),
    "mkd_smoke": ("configs/mkd.py:smoke,teacher_only", "mkd", "afnet",
                  cu.data_config("synthetic", smoke=True)),
}


@pytest.fixture(scope="module", params=["tiny", pytest.param("mkd_smoke", marks=pytest.mark.slow)])
def trained(request, tmp_path_factory):
  """A model trained for a few steps by the command line, without --workdir: its
  directory, the test images, the run's results and the model's name."""
  config, name, model_name, data_config = RUNS[request.param]
  cwd = tmp_path_factory.mktemp("cwd")
  proc = _run_main(f"--config={REPO / config}", cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"fer_jax: writing to workdirs/{name}" in proc.stdout  # the default workdir
  workdir = cwd / "workdirs" / name
  results = json.loads((workdir / "results.json").read_text())
  _, arrays = train.load_data(data_config)
  return workdir / "teacher" / "model", arrays["test"], results, model_name


def test_loaded_model_reproduces_the_trainers_evaluation(trained):
  directory, test, results, model_name = trained
  model = model_dir.load(directory)
  logits, va = jax.jit(model.apply)(test["image"])
  accuracy = float(np.mean(np.argmax(logits, -1) == test["label"]))
  assert accuracy == pytest.approx(results["teacher/test/accuracy"])
  # A few steps leave the tiny teacher near chance, where any weights score alike: the
  # weights themselves must be the ones selection kept in the phase's best checkpoint.
  best = checkpoint.Checkpoints(directory.parent / "best")
  kept, _ = best.restore(best.latest_step(), model.variables)
  best.close()
  assert set(kept) == set(model.variables) >= {"params"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(kept), model.variables)
  assert va.shape == (len(test["label"]), 0)
  spec = json.loads((directory / "model.json").read_text())
  assert spec["format_version"] == model_dir.FORMAT_VERSION
  assert (spec["model"], spec["image_shape"], spec["class_names"][:2]) == (
      model_name, [48, 48, 1], list(model.class_names[:2]))


def test_a_fresh_process_gets_identical_predictions(trained, tmp_path):
  directory, test, _, _ = trained
  np.save(tmp_path / "images.npy", test["image"][:20])
  script = textwrap.dedent(f"""
      import numpy as np
      from fer_jax import model_dir
      model = model_dir.load({str(directory)!r})
      logits, _ = model.apply(np.load({str(tmp_path / 'images.npy')!r}))
      np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(logits))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # this process's flags and compilation cache
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  here, _ = model_dir.load(directory).apply(test["image"][:20])
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), np.asarray(here))


def test_other_format_versions_and_missing_files_are_named(trained, tmp_path):
  directory, _, _, _ = trained
  other = model_dir.load(directory).save(tmp_path / "other")
  spec = json.loads((other / "model.json").read_text())
  (other / "model.json").write_text(json.dumps(dict(spec, format_version=99)))
  with pytest.raises(model_dir.ModelDirError, match=r"other: model format version 99; "
                                                    r"this fer_jax reads version 1"):
    model_dir.load(other)
  with pytest.raises(model_dir.ModelDirError, match="nowhere: neither a model directory nor"):
    model_dir.load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(model_dir.ModelDirError, match="not a fer_jax model directory"):
    model_dir.load(tmp_path / "empty")
  (tmp_path / "corrupt").mkdir()
  (tmp_path / "corrupt" / "model.json").write_text(json.dumps(spec))
  (tmp_path / "corrupt" / "variables.msgpack").write_bytes(b"\x00\x01 not msgpack")
  with pytest.raises(model_dir.ModelDirError, match="unreadable variables"):
    model_dir.load(tmp_path / "corrupt")


def test_a_failed_save_keeps_the_previous_directory(trained, tmp_path, monkeypatch):
  directory, test, _, _ = trained
  model = model_dir.load(directory)
  target = model.save(tmp_path / "model")
  before = (target / "variables.msgpack").read_bytes()

  def disk_full(_):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(flax.serialization, "msgpack_serialize", disk_full)
  zeroed = model_dir.TrainedModel(**{**model.__dict__, "variables": jax.tree.map(
      np.zeros_like, model.variables)})
  with pytest.raises(OSError, match="No space left"):
    zeroed.save(target)
  assert (target / "variables.msgpack").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind
  np.testing.assert_array_equal(model_dir.load(target).apply(test["image"][:4])[0],
                                model.apply(test["image"][:4])[0])
