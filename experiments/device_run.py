r"""The full-size FER2013 rows (AFNet teacher, MKD student) in one call of an accelerator.

A lent machine (the ``device`` tool) starts bare, can fetch nothing, and takes at most
64 MiB of working tree a call. FER2013 as built for TFDS is 81 MB, so it travels as a
pack: every split's faces as lossless WebP (70 % of the raw bytes) beside their numeric
fields, exactly the arrays ``fer_jax.train.load_data`` gives the trainer. TFDS is not
installed there and is never imported: the pack registers as an in-memory dataset.

Here (a built FER2013; about 3 minutes on 2 cores):

  python -m experiments.device_run pack --config=configs/mkd.py:data=fer2013,tier=full \
      --pack=.device/fer2013_pack.npz

There: ``experiments/device_fer2013.sh``, in one call of the device tool (it installs
the wheels the machine lacks and runs ``train``).

``train`` first compiles and times both phases' fused steps, then gives both phases
the most epochs (at most the config's 40) that fit ``--budget_s`` seconds from its start,
so a call never runs past its limit. It writes results.json, report.md, metrics.jsonl,
``plan.json`` (the timings and the epochs chosen) and the last phase's model directory to
``--results``.
"""
import hashlib
import io
import json
import math
import pathlib
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.benchmarks import train_step  # noqa: E402
from fer_jax import cli, train  # noqa: E402
from fer_jax.data import base  # noqa: E402

FLAGS = flags.FLAGS
_TIMED_STEPS = 10
# Seconds per phase besides its steps: the evaluation programs, the final checkpoint
# and model directory, and the final evaluation under the four occluders.
_OVERHEAD_S = 45.0


def _encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Lossless WebP of each HxWxC face (C = 1 or 3): (concatenated bytes, end offsets)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  blobs = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        buffer, format="WEBP", lossless=True, quality=100, method=5)
    blobs.append(buffer.getvalue())
  return (np.frombuffer(b"".join(blobs), np.uint8),
          np.cumsum([len(b) for b in blobs]).astype(np.int64))


def _decode(data: np.ndarray, ends: np.ndarray, channels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  starts = np.concatenate([[0], ends[:-1]])
  # WebP stores grey as RGB; its three equal channels convert back exactly.
  mode = "L" if channels == 1 else "RGB"
  faces = [np.asarray(Image.open(io.BytesIO(data[s:e].tobytes())).convert(mode))
           for s, e in zip(starts, ends)]
  return np.stack(faces).reshape(len(faces), *faces[0].shape[:2], channels)


def _digest(images: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def pack(data_cfg, path: pathlib.Path) -> None:
  """Writes the trainer's arrays of ``data_cfg`` to ``path``, faces as WebP."""
  dataset, arrays = train.load_data(data_cfg)
  content = {"class_names": np.array(dataset.class_names)}
  for split, fields in arrays.items():
    for key, value in fields.items():
      if key == "image":
        content[f"{split}.webp"], content[f"{split}.ends"] = _encode(value)
        content[f"{split}.sha256"] = np.array(_digest(value))
        content[f"{split}.channels"] = np.array(value.shape[-1])
      else:
        content[f"{split}.{key}"] = value
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **content)
  print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, splits {sorted(arrays)}")


def unpack(path: pathlib.Path) -> base.Dataset:
  """The packed dataset, each split's faces checked against their recorded digest."""
  with np.load(path) as content:
    splits = {}
    for split in {key.split(".")[0] for key in content.files if "." in key}:
      fields = {key.split(".", 1)[1]: content[key] for key in content.files
                if key.startswith(f"{split}.")}
      images = _decode(fields.pop("webp"), fields.pop("ends"), int(fields.pop("channels")))
      if _digest(images) != str(fields.pop("sha256")):
        raise ValueError(f"{path}: split {split!r} decodes to other faces than were packed")
      splits[split] = base.ArraySplit({"image": images, **fields})
    return base.Dataset("fer2013", tuple(str(c) for c in content["class_names"]), splits)


def register(path: pathlib.Path) -> str:
  """Registers the pack as a dataset (decoded once) and returns its name."""
  name = "packed_" + path.stem
  dataset = unpack(path)
  base.DATASETS.register(name)(lambda data_cfg: dataset)
  return name


def epochs_that_fit(config, seconds_left: float) -> tuple[int, dict]:
  """The most epochs (at most the config's) of every phase that fit ``seconds_left``.

  The steps are timed at the config's epochs, which the learning-rate schedule bakes
  into the program: the run reuses those compiled steps only at the same epochs, and
  fewer epochs pay each step's compile again.
  """
  timings = {name: train_step.time_phase(config, name, _TIMED_STEPS) for name in config.phases}
  _, arrays = train.load_data(config.data)
  train_size = len(arrays[config.data.train_split]["label"])
  per_epoch = sum(train_size // config[name].batch_size * timings[name]["step_s"]
                  for name in config.phases)
  overhead = _OVERHEAD_S * len(config.phases)
  most = int(min(config[name].epochs for name in config.phases))
  if most * per_epoch + overhead <= seconds_left:
    epochs = most
  else:
    overhead += sum(timings[name]["compile_s"] for name in config.phases)
    epochs = math.floor((seconds_left - overhead) / per_epoch)
  return epochs, {"timings": timings, "seconds_per_epoch": per_epoch,
                  "overhead_s": overhead, "seconds_left": seconds_left}


def define_flags() -> None:
  """The command line's flags, defined only when run: the tests import the packing."""
  config_flags.DEFINE_config_file("config", None, "The config to run (and whose data to pack).")
  flags.DEFINE_string("pack", ".device/fer2013_pack.npz", "The packed dataset.")
  flags.DEFINE_float("budget_s", 480.0, "train: seconds the whole command may take.")
  flags.DEFINE_string("results", "", "train: folder for the results (default: --workdir).")
  flags.DEFINE_string("workdir", ".device/run", "train: the run directory.")
  flags.mark_flags_as_required(["config"])


def run(config, pack_path: pathlib.Path, budget_s: float, workdir: pathlib.Path,
        results: pathlib.Path) -> None:
  """Times the phases, picks the epochs that fit ``budget_s``, trains and copies the results."""
  start = time.time()
  config.data.name = register(pack_path)
  epochs, plan = epochs_that_fit(config, budget_s - (time.time() - start))
  plan.update(epochs=epochs, config_epochs={n: config[n].epochs for n in config.phases})
  print("plan:", json.dumps(plan), flush=True)
  results.mkdir(parents=True, exist_ok=True)
  (results / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
  if epochs < 1:
    raise SystemExit(f"not one epoch of every phase fits {budget_s} s: {plan}")
  for name in config.phases:
    config[name].epochs = float(epochs)
    # A call's run never resumes: one checkpoint, at the end, instead of one an epoch.
    config[name].checkpoint_every_steps = 10**9
  train.train_and_evaluate(config, str(workdir))
  plan["wall_s"] = round(time.time() - start, 1)
  (results / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
  for name in ("results.json", "report.md", "metrics.jsonl"):
    shutil.copy(workdir / name, results / name)
  # The last phase's model directory (the student's: a few MB; the teacher's is 45 MB).
  shutil.copytree(workdir / config.phases[-1] / "model", results / f"{config.phases[-1]}_model",
                  dirs_exist_ok=True)


def main(argv):
  if argv[1:] == ["pack"]:
    pack(FLAGS.config.data, pathlib.Path(FLAGS.pack))
  elif argv[1:] == ["train"]:
    if not pathlib.Path(FLAGS.pack).is_file():
      cli.fail(f"--pack={FLAGS.pack}: no such file; write it with the pack command first")
    # The timing compiles each step once; with the config's epochs the run reuses it.
    jax.config.update("jax_compilation_cache_dir", str(REPO / ".device" / "jax_cache"))
    workdir = pathlib.Path(FLAGS.workdir)
    run(FLAGS.config, pathlib.Path(FLAGS.pack), FLAGS.budget_s, workdir,
        pathlib.Path(FLAGS.results) if FLAGS.results else workdir)
  else:
    raise app.UsageError("expected one command: pack or train")


if __name__ == "__main__":
  define_flags()
  logging.set_verbosity(logging.WARNING)
  cli.run(main)
