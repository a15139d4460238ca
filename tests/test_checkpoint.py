"""Orbax checkpoints: an interrupted save never becomes the latest step."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from fer_jax.checkpoint import Checkpoints

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
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ckpts = Checkpoints(tmp_path)
  assert ckpts.latest_step() == 1
  state, meta = ckpts.restore(1, {"w": np.zeros(4, np.float32)})
  np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))
  assert meta == {"note": "small"}
