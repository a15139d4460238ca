"""Frames/s of ``python -m fer_jax.predict VIDEO``: decode + detect + classify.

Generates a 720p (1280x720, 30 fps) H.264 video (MPEG-4 Part 2 if PyAV's
FFmpeg has no libx264) of one FER2013 PublicTest face, 200 px, drifting over
blurred-noise clutter, then runs the CLI's own video path (``run_video``:
PyAV decode in a background thread, MTCNN on batches of frames, one batched
classifier call per batch, rows kept in memory and counted) once to compile and
once timed, for each ``--detect_every``. Also times decoding alone (to RGB
arrays) and the detector alone on the same frames.

The classifier is ``--model``, a pretrained name or a model directory
(default: ``fer_jax.predict``'s default model).

Prints one JSON line. Usage:

  python experiments/benchmarks/predict_video.py            # detect_every 1 and 3
  python experiments/benchmarks/predict_video.py --detect_every=1,2,3,5 --frames=300
  python experiments/benchmarks/predict_video.py --model=fer2013-student
"""
import argparse
import io
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from fer_jax import predict  # noqa: E402

FER2013 = REPO.parent / "shared" / "data" / "fer2013" / "fer2013.npz"
SIZE = (720, 1280)
FPS = 30
FACE_SIDE = 200


def face48(index: int = 2) -> np.ndarray:
  """A FER2013 PublicTest face (one MTCNN finds; see tests/faces.py)."""
  with np.load(FER2013) as data:
    return data["pixels"][np.flatnonzero(data["usage"] == 1)[index]]


def clutter(shape, seed=0) -> np.ndarray:
  """Blurred, tinted RGB noise: background texture for the detector to reject."""
  rng = np.random.default_rng(seed)
  small = (shape[0] // 4, shape[1] // 4)
  channels = []
  for c in range(3):
    noise = Image.fromarray(rng.integers(0, 256, small, np.uint8))
    blurred = noise.filter(ImageFilter.GaussianBlur(2)).resize(shape[::-1], Image.BILINEAR)
    x = np.asarray(blurred, np.float32)
    channels.append(128 + (x - x.mean()) * 4 + 8 * (c - 1))
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def write_video(path: pathlib.Path, frames: int) -> str:
  """The benchmark video; returns the codec used."""
  import av  # pylint: disable=import-outside-toplevel
  face = Image.fromarray(face48()).convert("RGB").resize((FACE_SIDE, FACE_SIDE), Image.BICUBIC)
  background = Image.fromarray(clutter(SIZE))
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
    stream.bit_rate = 4_000_000
    for t in range(frames):
      canvas = background.copy()
      canvas.paste(face, (400 + 2 * t % 400, 200 + int(40 * np.sin(t / 15))))
      frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return codec


def time_cli(video: pathlib.Path, model: str, detect_every: int, args) -> dict:
  """Seconds of ``run_video`` after a compiling run, and the face rows it wrote
  (kept in memory: a run that finds no face times nothing worth quoting)."""
  cli = predict.parse_args([str(video), f"--model={model}", f"--detect_every={detect_every}",
                            f"--min_face_size={args.min_face_size}",
                            f"--max_side={args.max_side}", f"--batch={args.batch}"])
  predictor, writer, _ = predict.setup(cli)
  run = predict.Run(cli, predictor, writer, None)
  writer.stream = io.StringIO()
  predict.run_video(run, video, None)  # compiles
  writer.stream = io.StringIO()
  start = time.perf_counter()
  predict.run_video(run, video, None)
  seconds = time.perf_counter() - start
  return {"seconds": round(seconds, 3), "fps": round(args.frames / seconds, 1),
          "face_rows": writer.stream.getvalue().count("\n"), "bad_inputs": run.bad_inputs}


def time_parts(video: pathlib.Path, args) -> dict:
  """Decoding alone, and the detector alone on single frames (medians)."""
  from fer_jax.detect import mtcnn  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  frames = [f for _, _, f in predict.video_frames(video)]
  decode = time.perf_counter() - start
  detector = mtcnn.MTCNN(min_face_size=args.min_face_size, max_side=args.max_side)
  result = mtcnn.benchmark(detector, frames[len(frames) // 2], repeats=20)
  return {"decode_fps": round(len(frames) / decode, 1),
          "detect_only_fps": round(result["fps"], 1),
          "faces_on_middle_frame": len(result["faces"])}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=150)
  parser.add_argument("--detect_every", default="1,3")
  parser.add_argument("--model", default=predict.DEFAULT_MODEL, help="name or directory")
  parser.add_argument("--min_face_size", type=float, default=80)
  parser.add_argument("--max_side", type=int, default=640)
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    video = tmp / "face720p.mp4"
    codec = write_video(video, args.frames)
    result = {"video": f"{SIZE[1]}x{SIZE[0]} {codec} {args.frames} frames, one "
                       f"{FACE_SIDE} px face",
              "model": args.model,
              "min_face_size": args.min_face_size, "max_side": args.max_side,
              "batch": args.batch, "cpus": len(os.sched_getaffinity(0)),
              "load_average": round(os.getloadavg()[0], 2), "jax": jax.__version__,
              "backend": jax.default_backend(), "machine": platform.machine()}
    for k in (int(v) for v in args.detect_every.split(",")):
      result[f"detect_every={k}"] = time_cli(video, args.model, k, args)
    result.update(time_parts(video, args))
    result["load_average_after"] = round(os.getloadavg()[0], 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
