"""Orbax checkpoints: an interrupted save never becomes the latest step; a damaged
latest step falls back to the previous one; a failed write is one clear error."""
import errno
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fer_jax.checkpoint import CheckpointError, Checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]


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
  assert any("tmp" in p.name for p in tmp_path.iterdir()), "step 2 was never being written"
  proc.send_signal(signal.SIGKILL)
  assert "saved-2" not in proc.stdout.read(), "the kill came after step 2 was complete"
  proc.wait()
  ckpts = Checkpoints(tmp_path)
  assert ckpts.latest_step() == 1
  state, meta = ckpts.restore(1, {"w": np.zeros(4, np.float32)})
  np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))
  assert meta == {"note": "small"}


def _truncate_files(directory: pathlib.Path) -> None:
  """Cuts every file under ``directory`` to half its size, as a crashed disk might."""
  for path in directory.rglob("*"):
    if path.is_file():
      os.truncate(path, path.stat().st_size // 2)


def _saved(tmp_path, steps) -> Checkpoints:
  ckpts = Checkpoints(tmp_path)
  for step in steps:
    ckpts.save(step, {"w": np.full(4, step, np.float32)}, {"step": step})
    ckpts.wait()
  return ckpts


def test_a_damaged_latest_step_is_set_aside_and_the_previous_one_resumes(tmp_path, caplog):
  _saved(tmp_path, (1, 2)).close()
  _truncate_files(tmp_path / "2")
  ckpts = Checkpoints(tmp_path)
  step, state, meta = ckpts.restore_latest({"w": np.zeros(4, np.float32)})
  assert (step, meta) == (1, {"step": 1})
  np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))
  assert "checkpoint step 2" in caplog.text and "falling back to step 1" in caplog.text
  assert ckpts.latest_step() == 1 and (tmp_path / "damaged-2").is_dir()
  # Training on saves step 2 again over the set-aside one.
  ckpts.save(2, {"w": np.full(4, 7, np.float32)}, {"step": 2})
  ckpts.wait()
  assert Checkpoints(tmp_path).restore_latest({"w": np.zeros(4, np.float32)})[0] == 2


def test_when_no_step_reads_the_error_is_raised_and_nothing_is_set_aside(tmp_path):
  _saved(tmp_path, (1,)).close()
  _truncate_files(tmp_path / "1")
  # Orbax reads the halved metadata first (json.JSONDecodeError, a ValueError); TensorStore
  # raises ValueError too. A TypeError or KeyError would be a bug of ours.
  with pytest.raises(ValueError):
    Checkpoints(tmp_path).restore_latest({"w": np.zeros(4, np.float32)})
  assert (tmp_path / "1").is_dir() and not list(tmp_path.glob("damaged-*"))


def test_a_failed_write_is_one_clear_error_and_the_previous_step_stays_intact(
    tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

  ckpts = _saved(tmp_path, (1,))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(CheckpointError, match=r"No space left on device.*step 1, is intact"):
    ckpts.save(2, {"w": np.full(4, 2, np.float32)}, {"step": 2})
    ckpts.wait()
  monkeypatch.undo()
  step, state, _ = Checkpoints(tmp_path).restore_latest({"w": np.zeros(4, np.float32)})
  assert step == 1
  np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))


def test_a_replicated_state_saves_without_compiling_and_restores_onto_its_sharding(
    tmp_path, caplog):
  # Orbax's default splits an array with a dimension divisible by the replicas among
  # them, compiling one slicing program per array shape and device.
  replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec())
  state = jax.device_put({"w": np.arange(48, dtype=np.float32).reshape(8, 6),
                          "b": np.arange(16, dtype=np.float32)}, replicated)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    ckpts = Checkpoints(tmp_path)
    ckpts.save(1, state, {"step": 1})
    ckpts.wait()
  assert jax.device_count() == 8 and "Compiling" not in caplog.text, caplog.text
  _, restored, _ = Checkpoints(tmp_path).restore_latest(state)
  for name, array in restored.items():
    np.testing.assert_array_equal(array, state[name])
    assert array.sharding == replicated, name


def test_a_checkpoint_of_orbax_standard_handler_restores(tmp_path):
  """Runs saved before the state had its own handler (Orbax's StandardSave) resume."""
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(4)}),
                                            meta=ocp.args.JsonSave({"step": 3})))
  step, state, meta = Checkpoints(tmp_path).restore_latest({"w": np.zeros(4)})
  assert (step, meta) == (3, {"step": 3})
  np.testing.assert_array_equal(state["w"], np.ones(4))
