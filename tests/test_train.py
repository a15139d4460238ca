"""The core: one fused, sharded distillation step; exact resume; clear failures."""
import inspect
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fer_jax import config_utils as cu
from fer_jax import steps
from fer_jax import train
from fer_jax.checkpoint import Checkpoints
from fer_jax.data.augment import default_augment_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(stem="small", width=4)


def tiny_config(steps_per_phase=4) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "tiny"
  config.seed = 0
  config.data = cu.data_config("synthetic")
  config.data.split_sizes = {"train": 64, "validation": 16, "test": 16}
  config.data.occlusion_kinds = ("eyes",)
  config.augment = default_augment_config()
  config.augment.occlusion_prob = 0.5
  config.eval_batch_size = 16
  config.phases = ("teacher", "student")
  common = dict(epochs=1, batch_size=16, optimizer=cu.optimizer_config("sgd", lr=0.05),
                steps=steps_per_phase, log_every_steps=1)
  config.teacher = cu.phase_config("resnet18", TINY, {"ce": dict(weight=1.0)}, **common)
  config.student = cu.phase_config(
      "resnet18", TINY,
      {"ce": dict(weight=0.5),
       "kd": dict(kind="hinton_kd", weight=0.5, temperature=4.0),
       "mkd": dict(pairs=(("stage3", "stage3"), ("stage4", "stage4"))),
       "at": dict(kind="attention_transfer", weight=10.0, pairs=(("stage3", "stage3"),))},
      teacher="teacher", **common)
  return config


def build_student_phase(config, mesh, tmp_path):
  """The student phase with an (untrained) teacher, ready to step."""
  dataset, arrays = train.load_data(config.data)
  phase, state = train.untrained_phases(config, dataset, arrays, mesh, tmp_path)["student"]
  return phase, state, arrays


def test_contrastive_state_shares_no_buffer_on_one_device(tmp_path):
  # The step donates its state. On one device an EMA encoder that aliases the
  # online parameters is one buffer donated twice, which XLA refuses at step 1.
  config = tiny_config()
  config.phases = ("teacher",)
  config.teacher = cu.phase_config(
      "contrastive", dict(encoder="resnet18", encoder_kwargs=TINY), {"moco": dict(weight=1.0)},
      epochs=1, steps=1, batch_size=16, optimizer=cu.optimizer_config("sgd"), contrastive=True,
      queue_size=32, ema_momentum=0.99, evaluate=False)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  dataset, arrays = train.load_data(config.data)
  phase = train.Phase(config, "teacher", dataset, arrays, mesh, tmp_path,
                      train.MetricWriter(tmp_path / "metrics.jsonl"), {})
  leaves = [x for x in jax.tree.leaves(phase.init_state()) if x.size]
  pointers = [x.unsafe_buffer_pointer() for x in leaves]
  assert len(set(pointers)) == len(pointers)


def run_steps(phase, state, arrays, mesh, n, instrument=lambda f: f, weights=None):
  step_fn = steps.make_train_step(phase.step_spec(), instrument)
  data = jax.device_put(arrays["train"], steps.replicated(mesh))
  teacher_vars = jax.device_put(phase.teacher.variables, steps.replicated(mesh))
  for i in range(n):
    w = weights(i) if weights else phase.weights
    state, metrics = step_fn(state, jax.device_put(w, steps.replicated(mesh)), teacher_vars,
                             data)
  return step_fn, state, metrics, (teacher_vars, data)


def test_distillation_step_traces_once_and_weight_changes_do_not_recompile(tmp_path):
  chex.clear_trace_counter()
  config = tiny_config()
  mesh = train.make_mesh()
  phase, state, arrays = build_student_phase(config, mesh, tmp_path)
  weights = lambda i: dict(phase.weights, kd=jnp.float32(0.1 * (i + 1)))
  step_fn, state, metrics, _ = run_steps(phase, state, arrays, mesh, 3,
                                         instrument=lambda f: chex.assert_max_traces(f, n=1),
                                         weights=weights)
  assert step_fn._cache_size() == 1
  assert int(state["step"]) == 3
  assert set(metrics) >= {"loss", "loss/ce", "loss/kd", "loss/mkd", "loss/at", "accuracy"}
  total = sum(float(weights(2)[k]) * float(metrics[f"loss/{k}"]) for k in phase.weights)
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-5)


def test_step_is_one_program_without_host_round_trips(tmp_path):
  config = tiny_config()
  mesh = train.make_mesh()
  phase, state, arrays = build_student_phase(config, mesh, tmp_path)
  step_fn, state, _, (teacher_vars, data) = run_steps(phase, state, arrays, mesh, 1)
  weights = jax.device_put(phase.weights, steps.replicated(mesh))
  hlo = step_fn.lower(state, weights, teacher_vars, data).compile().as_text()
  for host_op in ("outfeed", "infeed", "host_callback", "xla_python_cpu_callback", " send(",
                  " recv("):
    assert host_op not in hlo, host_op
  # Every input is on the device: any transfer inside the step would raise here.
  with jax.transfer_guard("disallow"):
    state, metrics = step_fn(state, weights, teacher_vars, data)
  assert int(jax.device_get(state["step"])) == 2


def test_sharded_step_equals_single_device_step(tmp_path):
  assert jax.device_count() == 8
  config = tiny_config()
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    phase, state, arrays = build_student_phase(config, mesh, tmp_path / str(len(devices)))
    _, state, metrics, _ = run_steps(phase, state, arrays, mesh, 2)
    results.append(jax.device_get((state["params"], metrics["loss"])))
  (params_1, loss_1), (params_8, loss_8) = results
  np.testing.assert_allclose(loss_1, loss_8, rtol=1e-4)
  chex.assert_trees_all_close(params_1, params_8, rtol=1e-4, atol=1e-5)


def _restore_raw(directory):
  import orbax.checkpoint as ocp
  mgr = ocp.CheckpointManager(directory)
  step = mgr.latest_step()
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  return step, restored["state"]


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
  config = tiny_config(steps_per_phase=6)
  config.student.checkpoint_every_steps = 3
  config.teacher.checkpoint_every_steps = 3
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))

  interrupted = tmp_path / "interrupted"
  real_make = steps.make_train_step

  def crashing_make(spec, instrument=lambda f: f):
    step_fn = real_make(spec, instrument)
    calls = {"n": 0}

    def wrapped(*args):
      calls["n"] += 1
      if spec.teacher is not None and calls["n"] == 5:  # student, after the step-3 save
        raise KeyboardInterrupt("simulated preemption")
      return step_fn(*args)
    return wrapped

  monkeypatch.setattr(steps, "make_train_step", crashing_make)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(interrupted))
  monkeypatch.setattr(steps, "make_train_step", real_make)
  step, _ = _restore_raw(interrupted / "student" / "checkpoints")
  assert step == 3
  train.train_and_evaluate(config, str(interrupted))

  step_a, state_a = _restore_raw(straight / "student" / "checkpoints")
  step_b, state_b = _restore_raw(interrupted / "student" / "checkpoints")
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(state_a["params"], state_b["params"])
  chex.assert_trees_all_equal(state_a["opt_state"], state_b["opt_state"])
  results = json.loads((interrupted / "results.json").read_text())
  assert "student/test/accuracy" in results and "student/test_occluded_eyes/accuracy" in results


def test_non_finite_loss_stops_with_diagnosis_and_keeps_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(steps_per_phase=4)
  config.phases = ("teacher",)
  config.teacher.checkpoint_every_steps = 2
  config.teacher.terms = {"ce": dict(weight=1.0),
                          "blowup": dict(kind="ce", weight=1.0, label_smoothing=0.0)}
  dataset, arrays = train.load_data(config.data)
  mesh = train.make_mesh()
  writer = train.MetricWriter(tmp_path / "m.jsonl")
  phase = train.Phase(config, "teacher", dataset, arrays, mesh, tmp_path, writer, {})
  phase.weights = dict(phase.weights, blowup=jnp.float32(0.0))
  original = steps.make_train_step

  def poisoned(spec, instrument=lambda f: f):
    """From step 3 on, an infinite weight makes the loss non-finite."""
    fn = original(spec, instrument)
    def call(state, weights, *rest):
      if int(jax.device_get(state["step"])) >= 2:
        weights = dict(weights, blowup=jnp.float32(np.inf))
      return fn(state, weights, *rest)
    return call

  monkeypatch.setattr(steps, "make_train_step", poisoned)
  with pytest.raises(FloatingPointError) as err:
    phase.train()
  message = str(err.value)
  assert "step 3" in message and "blowup=" in message and "ce=" in message
  assert "last good checkpoint is step 2" in message
  step, state = _restore_raw(tmp_path / "teacher" / "checkpoints")
  assert step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_unknown_layer_name_fails_before_compiling(tmp_path):
  config = tiny_config()
  config.student.terms.mkd.pairs = (("stage9", "stage3"),)
  mesh = train.make_mesh()
  dataset, arrays = train.load_data(config.data)
  writer = train.MetricWriter(tmp_path / "m.jsonl")
  teacher = train.Phase(config, "teacher", dataset, arrays, mesh, tmp_path, writer, {})
  finished = {"teacher": teacher.finish(None)}
  phase = train.Phase(config, "student", dataset, arrays, mesh, tmp_path, writer, finished)
  with pytest.raises(ValueError, match="student layer 'stage9'.*available: logits, embedding"):
    phase.check_layer_names()


def test_terms_that_read_the_teacher_need_one(tmp_path):
  config = tiny_config()
  config.student.teacher = ""
  dataset, arrays = train.load_data(config.data)
  writer = train.MetricWriter(tmp_path / "m.jsonl")
  with pytest.raises(ValueError, match="student: loss term.s. at, kd, mkd read the teacher"):
    train.Phase(config, "student", dataset, arrays, train.make_mesh(), tmp_path, writer, {})
  config.student.terms = {"ce": dict(weight=1.0)}
  train.Phase(config, "student", dataset, arrays, train.make_mesh(), tmp_path, writer, {})


def test_reads_teacher_matches_what_each_term_requires():
  for kind in train.objectives.TERMS.names():
    source = inspect.getsource(train.objectives.TERMS.get(kind))
    assert train.objectives.reads_teacher(kind) == ("_require_teacher" in source), kind


def test_unknown_term_field_is_named():
  config = tiny_config()
  config.student.terms.kd.temprature = 2.0
  with pytest.raises(ValueError, match="'kd'.*temprature"):
    train.objectives.term_specs(config.student.terms)


def test_unwritable_workdir_is_one_clear_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(SystemExit, match="cannot be written"):
    train.check_workdir(str(blocker / "sub"))


def _run_main(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fer_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_unknown_config_key_is_reported(tmp_path):
  proc = _run_main("--config=configs/mkd.py:smoke", f"--workdir={tmp_path}",
                   "--config.student.bach_size=3")
  assert proc.returncode != 0
  assert "bach_size" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "student").exists()


def test_interrupted_save_never_loads(tmp_path):
  """SIGKILL in the middle of writing a checkpoint leaves the previous one as latest."""
  script = textwrap.dedent(f"""
      import numpy as np, sys, time
      from fer_jax.checkpoint import Checkpoints
      c = Checkpoints({str(tmp_path)!r})
      c.save(1, {{"w": np.ones(4, np.float32)}}, {{"note": "small"}})
      c.wait()
      print("saved-1", flush=True)
      c.save(2, {{"w": np.random.rand(400_000_000 // 4).astype(np.float32)}}, {{"note": "big"}})
      c.wait()
      print("saved-2", flush=True)
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, XLA_FLAGS=""))
  assert proc.stdout.readline().strip() == "saved-1"
  deadline = time.time() + 60
  while time.time() < deadline and not any("tmp" in p.name for p in tmp_path.iterdir()):
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ckpts = Checkpoints(tmp_path)
  assert ckpts.latest_step() == 1
  state, meta = ckpts.restore(1, {"w": np.zeros(4, np.float32)})
  np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))
  assert meta == {"note": "small"}
