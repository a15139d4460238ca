"""The trainer: exact resume, the NaN stop, set-up errors before compiling, the command line."""
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import fit as fit_lib
from fer_jax import steps
from fer_jax import train
from fer_jax import config_utils as cu
from fer_jax.data import streaming
from fer_jax.config_utils import ConfigError
import fixtures  # tests/fixtures.py, on the path as a sibling test module
from helpers import data_of, restore_raw, tiny_config, untrained

REPO = pathlib.Path(__file__).resolve().parents[1]


def _straight_and_interrupted(config, tmp_path, monkeypatch):
  """Runs ``config`` (4 steps a phase) straight through, and again stopped in the
  student phase after its step-2 checkpoint, then resumed; returns both workdirs."""
  config.student.checkpoint_every_steps = 2
  config.teacher.checkpoint_every_steps = 2
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))

  interrupted = tmp_path / "interrupted"
  real_make = steps.make_train_step

  def crashing_make(spec, instrument=lambda f: f):
    step_fn = real_make(spec, instrument)
    calls = {"n": 0}

    def wrapped(*args):
      calls["n"] += 1
      if spec.teacher is not None and calls["n"] == 3:  # student, after the step-2 save
        raise KeyboardInterrupt("simulated preemption")
      return step_fn(*args)
    return wrapped

  monkeypatch.setattr(steps, "make_train_step", crashing_make)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(interrupted))
  monkeypatch.setattr(steps, "make_train_step", real_make)
  step, _ = restore_raw(interrupted / "student" / "checkpoints")
  assert step == 2
  train.train_and_evaluate(config, str(interrupted))

  step_a, state_a = restore_raw(straight / "student" / "checkpoints")
  step_b, state_b = restore_raw(interrupted / "student" / "checkpoints")
  assert step_a == step_b == 4
  chex.assert_trees_all_equal(state_a["params"], state_b["params"])
  chex.assert_trees_all_equal(state_a["opt_state"], state_b["opt_state"])
  results = json.loads((interrupted / "results.json").read_text())
  assert results == json.loads((straight / "results.json").read_text()) | {
      k: v for k, v in results.items() if k.endswith("train_seconds")}
  return straight, interrupted, results


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
  # The default tiny config: its teacher and student steps are the programs that
  # test_steps.py and the NaN test below compile, so the shared cache can serve them.
  config = tiny_config()
  _, interrupted, results = _straight_and_interrupted(config, tmp_path, monkeypatch)
  assert "student/test/accuracy" in results and "student/test_occluded_eyes/accuracy" in results
  # Each phase left a model directory holding its selected parameters.
  for phase in config.phases:
    assert (interrupted / phase / "model" / "model.json").is_file()
  # The teacher finished before the interruption; resumed at its end, it reports the
  # training time its last checkpoint recorded, not the zero steps of the resumed loop.
  meta = json.loads((interrupted / "teacher" / "checkpoints" / "4" / "meta" / "metadata")
                    .read_text())
  recorded = meta["train_seconds"]
  assert recorded > 0.5  # loading the compiled step alone takes longer
  # results.json rounds to 0.1 s.
  assert recorded - 0.05 <= results["teacher/train_seconds"] < recorded + 1


@pytest.mark.slow  # builds a dataset and runs 3 times: 80 s
def test_a_training_split_over_the_memory_limit_streams_and_resumes_exactly(
    tmp_path, monkeypatch):
  from test_data_builders import write_affectnet_download  # pylint: disable=g-import-not-at-top
  write_affectnet_download(tmp_path / "download")
  config = tiny_config()
  config.data = cu.data_config("affectnet")
  config.data.update(manual_dir=str(tmp_path / "download"), data_dir=str(tmp_path / "tfds"),
                     occlusion_kinds=("eyes",), max_resident_mb=0.01)
  config.data.image_size = 32
  for phase in config.phases:
    config[phase].batch_size = 8
  loaded, starts = [], []
  real_as_arrays, real_batches = train.as_arrays, streaming.batches
  monkeypatch.setattr(train, "as_arrays", lambda split: loaded.append(len(split)) or
                      real_as_arrays(split))
  monkeypatch.setattr(streaming, "batches", lambda *args, **kwargs: starts.append(
      kwargs["first_batch"]) or real_batches(*args, **kwargs))
  _straight_and_interrupted(config, tmp_path, monkeypatch)
  # 8 training faces (32x32x3, 24 KiB: over the limit) never loaded whole; the
  # 16 validation faces were. Each phase streamed from its start; on resuming, the
  # finished teacher from its end and the student from step 2.
  assert set(loaded) == {16}
  assert starts == [0, 0, 0, 0, 4, 2]


def test_non_finite_loss_stops_with_diagnosis_and_keeps_checkpoint(tmp_path, monkeypatch):
  # The tiny teacher's own program (the resume test compiled it): the loss weights
  # are arguments of the step, so an infinite one needs no other program.
  config = tiny_config()
  config.phases = ("teacher",)
  del config["student"]
  config.teacher.checkpoint_every_steps = 2
  mesh = train.make_mesh()
  phase, arrays = untrained(config, mesh, "teacher")
  original = steps.make_train_step

  def poisoned(spec, instrument=lambda f: f):
    """From step 3 on, an infinite weight makes the loss non-finite."""
    fn = original(spec, instrument)
    def call(state, weights, *rest):
      if int(jax.device_get(state["step"])) >= 2:
        weights = dict(weights, ce=jnp.float32(np.inf))
      return fn(state, weights, *rest)
    return call

  monkeypatch.setattr(steps, "make_train_step", poisoned)
  data = jax.device_put(arrays["train"], steps.replicated(mesh))
  with pytest.raises(FloatingPointError) as err:
    fit_lib.fit(phase.program, phase.spec, phase.state, data, {}, tmp_path / "teacher",
                fit_lib.MetricWriter(tmp_path / "m.jsonl"), None)
  message = str(err.value)
  assert "step 3" in message and "ce=" in message
  assert "last good checkpoint is step 2" in message
  step, state = restore_raw(tmp_path / "teacher" / "checkpoints")
  assert step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_unknown_layer_name_fails_before_compiling(monkeypatch):
  config = tiny_config()
  config.student.terms.mkd.pairs = (("stage9", "stage3"),)
  monkeypatch.setattr(steps, "make_train_step", lambda *a: pytest.fail("compiled a step"))
  data, _ = data_of(config)
  with pytest.raises(ConfigError, match="student 'stage9'.*available: logits, embedding"):
    train.setup_phases(config, data, train.make_mesh())


def test_terms_that_read_the_teacher_need_one():
  config = tiny_config()
  config.student.teacher = ""
  data, _ = data_of(config)
  with pytest.raises(ConfigError, match="student: loss term.s. at, kd, mkd read the teacher"):
    train.setup_phases(config, data, train.make_mesh())
  config.student.terms = {"ce": dict(weight=1.0)}
  programs = train.setup_phases(config, data, train.make_mesh())
  assert programs["student"].teacher is None and programs["student"].spec.teacher is None


def test_a_frozen_part_must_be_initialised():
  config = tiny_config()
  config.student.freeze = ("stem",)
  data, _ = data_of(config)
  with pytest.raises(ConfigError, match=r"config\.student\.freeze=\('stem',\) keeps parameters "
                                        r"that were never trained"):
    train.setup_phases(config, data, train.make_mesh())
  config.student.init_from = "teacher"
  train.setup_phases(config, data, train.make_mesh())


@pytest.mark.parametrize("field, value, named", [
    ("bach_size", 3, r"config\.student: unknown field 'bach_size'; known: "
                     r"model, model_kwargs, terms, epochs, steps, batch_size"),
    ("ema_decay", 1.0, r"config\.student\.ema_decay=1\.0: expected a decay in \[0, 1\)"),
])
def test_a_phase_field_mistake_is_named(field, value, named):
  config = tiny_config()
  config.student[field] = value
  data, _ = data_of(config)
  with pytest.raises(ConfigError, match=named):
    train.setup_phases(config, data, train.make_mesh())


def test_unwritable_workdir_is_one_clear_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(SystemExit, match="cannot be written"):
    train.check_workdir(str(blocker / "sub"))


def _run_main(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "fer_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


# One case per path a mistake takes: an override of a missing field, a config argument,
# a setup check (layer names; model and term fields are unit-tested in test_objectives and
# test_configs), a config file that does not load, and a dataset that is not there.
@pytest.mark.parametrize("args,named", [
    (("--config=configs/mkd.py:smoke", "--config.teacher.bogus=1"), "bogus"),
    (("--config=configs/mkd.py:smoke", "--config.student.bach_size=3"), "bach_size"),
    (("--config=configs/mkd.py:smoke,bogus=1",), "bogus"),
    (("--config=configs/mkd.py:smoke",
      "--config.student.terms.mkd.pairs=(('stage9','stage2'),)"), "stage9"),
    (("--config=configs/teacher_bounded.py:seed=x",), "seed"),
    (("--config=configs/nothere.py",), "configs/nothere.py"),
    (("--config=configs/mkd.py:smoke", "--config.data.name=nosuch"), "config.data.name"),
    (("--config=configs/mkd.py:smoke", "--config.data.test_split=nosuch"),
     "config.data.test_split"),
    (("--config=configs/teacher_bounded.py:data=affectnet",
      "--config.data.data_dir=/nonexistent"), "manual_dir"),
])
def test_cli_config_mistakes_are_one_line_with_exit_status_2(tmp_path, args, named):
  proc = _run_main(*args, f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("I", "W"))]
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "student").exists()


def test_cli_malformed_download_is_one_line_naming_file_row_and_field(tmp_path):
  csv_path = fixtures.write_fer2013_csv_with(tmp_path / "download", 3, "emotion", "9")
  proc = _run_main("--config=configs/mkd.py:data=fer2013,tier=quick",
                   f"--config.data.manual_dir={tmp_path / 'download'}",
                   f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "error: " + str(csv_path) + ", line 3: unknown label 9" in proc.stderr
  assert not (tmp_path / "tfds").exists()


def test_training_on_arrays_imports_neither_tfds_nor_grain():
  # A packed dataset on a bare accelerator, or prediction, needs neither.
  code = ("import sys, fer_jax.train, fer_jax.predict; "
          "print(sorted(m for m in ('tensorflow_datasets', 'grain') if m in sys.modules))")
  shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
  assert shown.strip() == "[]"
