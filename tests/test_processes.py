"""Whole runs of the command line as separate OS processes: two processes against
one, and runs killed with SIGKILL at seeded random moments, then resumed.

Slow (every launch compiles its programs anew, about 3 + 6 minutes on 2 cores):
  python -m pytest -m slow tests/test_processes.py
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from helpers import restore_raw

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12  # per phase; an epoch of the tiny config is 4 steps
ARGS = (f"--config=tests/tiny_config_file.py:{STEPS}",
        "--config.teacher.checkpoint_every_steps=3", "--config.student.checkpoint_every_steps=3")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, processes: int = 1, devices: int = 1) -> list[subprocess.Popen]:
  """The main job in ``processes`` processes (one CPU device each) or one with ``devices``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  command = [sys.executable, "-m", "fer_jax.main", *ARGS, f"--workdir={workdir}"]
  cluster = ([f"--coordinator_address=localhost:{_free_port()}", f"--num_processes={processes}"]
             if processes > 1 else [])
  return [subprocess.Popen(command + cluster + ([f"--process_id={i}"] if cluster else []),
                           cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
          for i in range(processes)]


def _finish(procs) -> list[str]:
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _logged(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kill_at(procs, workdir, phase: str, step: int, delay: float, seen: int) -> bool:
  """SIGKILLs ``procs`` ``delay`` s after a new metrics line logs ``phase`` at ``step``
  or later; False when they ended before."""
  index = {"teacher": 0, "student": 1}
  while all(p.poll() is None for p in procs):
    if any("split" not in r and (index[r["phase"]], r["step"]) >= (index[phase], step)
           for r in _logged(workdir)[seen:]):
      time.sleep(delay)
      break
    time.sleep(0.02)
  alive = all(p.poll() is None for p in procs)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  return alive


def _compare(run_a, run_b, exact=True):
  """The same final student state and (training time aside) the same results."""
  _, state_a = restore_raw(run_a / "student" / "checkpoints")
  _, state_b = restore_raw(run_b / "student" / "checkpoints")
  tolerance = {} if exact else dict(rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state_a["params"], state_b["params"], **tolerance)
  results = [{k: v for k, v in json.loads((r / "results.json").read_text()).items()
              if not k.endswith("train_seconds")} for r in (run_a, run_b)]
  assert results[0].keys() == results[1].keys()
  for key, value in results[0].items():
    assert value == pytest.approx(results[1][key], rel=1e-5, abs=1e-6), key


def test_two_processes_equal_one_and_resume_after_both_are_killed(tmp_path):
  # One process on two devices: the same mesh, so the same arithmetic.
  _finish(_launch(tmp_path / "one", devices=2))
  outputs = _finish(_launch(tmp_path / "two", processes=2))
  _compare(tmp_path / "one", tmp_path / "two", exact=False)
  # Reports and metrics come from process 0 alone, each record once.
  assert "full results" in outputs[0] and "full results" not in outputs[1]
  records = [(r["phase"], r["step"], r.get("split")) for r in _logged(tmp_path / "two")]
  assert len(records) == len(set(records)) == 2 * (STEPS + STEPS // 4)
  assert not list((tmp_path / "two").glob(".write_probe*"))

  killed = tmp_path / "killed"
  assert _kill_at(_launch(killed, processes=2), killed, "student", 5, 0.0, 0)
  assert not (killed / "results.json").exists()
  assert restore_raw(killed / "student" / "checkpoints")[0] < STEPS
  _finish(_launch(killed, processes=2))
  _compare(tmp_path / "two", killed)


def test_ten_seeded_kills_each_resumed_end_where_an_uninterrupted_run_does(tmp_path):
  _finish(_launch(tmp_path / "straight"))
  rng = np.random.default_rng(0)
  points = sorted(rng.choice(2 * STEPS, size=10, replace=False))
  run, interrupted = tmp_path / "killed", 0
  for point in points:
    phase, step = ("teacher", "student")[point // STEPS], point % STEPS + 1
    seen = len(_logged(run))
    interrupted += _kill_at(_launch(run), run, phase, step, float(rng.uniform(0, 0.3)), seen)
  assert interrupted >= 8, f"only {interrupted} of 10 kills hit a running job"
  _finish(_launch(run))
  _compare(tmp_path / "straight", run)
