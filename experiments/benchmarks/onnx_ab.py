"""Batch-1 latency of several exported ONNX files, interleaved in one process.

For comparing two exports of the same model (e.g. before and after a change to
``fer_jax.export``): separate runs on shared cores drift by more than such a
change, so every file gets a session per thread count and the files take turns,
round by round. Inputs are FER2013 PublicTest faces (uint8, one per call).

  python experiments/benchmarks/onnx_ab.py OLD.onnx NEW.onnx [--threads=1,2]
      [--rounds=6] [--calls=300]

Prints one line per file and thread count: each round's median (ms) and their
median. Pin the process (``taskset -c 0,1``) to the cores it may use.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fer_jax import export  # noqa: E402


def round_median_ms(sess, faces: np.ndarray, calls: int, warmup: int = 20) -> float:
  for i in range(warmup):
    export.run(sess, faces[i % len(faces)][None])
  times = []
  for i in range(calls):
    start = time.perf_counter()
    export.run(sess, faces[i % len(faces)][None])
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("onnx", nargs="+")
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--calls", type=int, default=300)
  parser.add_argument("--npz", default=str(export.DEFAULT_CALIBRATION))
  args = parser.parse_args()
  faces = export.fer2013_faces(args.npz, usage=1, count=256)
  for threads in map(int, args.threads.split(",")):
    sessions = {path: export.session(path, threads) for path in args.onnx}
    rounds = {path: [] for path in args.onnx}
    for _ in range(args.rounds):
      for path, sess in sessions.items():
        rounds[path].append(round_median_ms(sess, faces, args.calls))
    for path, values in rounds.items():
      print(f"threads={threads} {path}: rounds {np.round(values, 3).tolist()} ms, "
            f"median {np.median(values):.3f} ms")


if __name__ == "__main__":
  main()
