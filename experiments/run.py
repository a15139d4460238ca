r"""Runs reproduction rows and writes the committed tables and plots.

  python -m experiments.run --suite=fer2013 --rows=teacher,student_alone,mkd \
      --workroot=workdirs/rows [--quick] [--seeds=0,1,2]

The teacher row is trained first and reused (``teacher_checkpoint``) by every
student row of the same seed that distils it. Writes experiments/<suite>/results.json (flat
``"<row>/<split>/<metric>"``, mean over seeds, plus ``_std``) and results.md
(one table, each row with its command, hardware, wall time and seeds), and
PNG plots: learning curves, the best student's and the teacher's confusion
matrices, and the teacher's region-attention maps on occluded test faces.
Rows already present in results.json are kept, so suites can be filled in
over several runs; so are seeds: a seed whose run directory finished earlier
is re-evaluated from its checkpoint, and keeps the wall time recorded when it
trained (``wall_seconds_per_seed`` in rows.json; ``wall_seconds`` is their mean).
"""
import json
import pathlib
import time

import numpy as np
from absl import flags

from experiments import hardware
from experiments import rows as rows_lib
from fer_jax import checkpoint, cli, train
from fer_jax.tools import count as count_lib

_SUITE = flags.DEFINE_enum("suite", "fer2013", ["fer2013", "ferplus", "synthetic"],
                           "Which dataset suite (synthetic: the embedded default faces).")
_ROWS = flags.DEFINE_list("rows", ["teacher", "mkd"], f"Rows to run: {', '.join(rows_lib.ROWS)}")
_WORKROOT = flags.DEFINE_string("workroot", "workdirs/rows", "Where run directories go.")
_QUICK = flags.DEFINE_bool("quick", False,
                           "2-core CPU budget: the configs' cpu models, few epochs.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; mean and std are reported.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Override every phase's epochs (0: the config's).")
_STEPS = flags.DEFINE_integer("steps", 0, "Override every phase's steps (a dry run).")

HERE = pathlib.Path(__file__).resolve().parent
IMAGE_SHAPE = (48, 48, 1)  # FER2013, FER+ and the embedded faces


def _row_arg(row, seed, options, teacher_dir):
  fields = [f"row={row}", f"seed={seed}", *options]
  if teacher_dir:
    fields.append(f"teacher_checkpoint={teacher_dir}")
  return ",".join(fields)


def _reported_phase(config):
  return "probe" if "probe" in config.phases else config.phases[-1]


def _cpu_images_per_second(phase_cfg, workdir: pathlib.Path) -> float:
  class_names = json.loads((workdir / "details.json").read_text())["class_names"]
  return count_lib.cpu_images_per_second(
      phase_cfg.model, tuple(phase_cfg.get("input_shape", None) or IMAGE_SHAPE),
      num_classes=len(class_names), **dict(phase_cfg.get("model_kwargs", None) or {}))


def run_rows(suite: str, rows: list[str], seeds: list[int], workroot: str,
             options: tuple[str, ...] = (), out_dir: pathlib.Path | None = None) -> None:
  """Trains (or re-evaluates) ``rows`` over ``seeds`` and rewrites the suite's tables.

  ``options`` are row-config fields appended to each row's argument (``quick``,
  ``epochs=N``, ``steps=N``); ``out_dir`` defaults to experiments/<suite>.
  """
  out_dir = out_dir or HERE / suite
  results_path = out_dir / "results.json"
  table = json.loads(results_path.read_text()) if results_path.exists() else {}
  meta_path = out_dir / "rows.json"
  meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
  module = f"experiments/{suite}/config.py"
  for row in rows:
    per_seed, workdirs, walls = [], [], {}
    earlier_walls = meta.get(row, {}).get("wall_seconds_per_seed", {})
    for seed in seeds:
      teacher_dir = pathlib.Path(workroot) / suite / f"teacher_s{seed}" / "teacher" / "model"
      reuse = teacher_dir.exists() and rows_lib.reuses_teacher(row)
      arg = _row_arg(row, seed, options, teacher_dir if reuse else "")
      config = rows_lib.row_config(suite, arg)
      workdir = pathlib.Path(workroot) / suite / f"{row}_s{seed}"
      trained_before = (workdir / "results.json").exists() and str(seed) in earlier_walls
      start = time.time()
      results = train.train_and_evaluate(config, str(workdir))
      walls[str(seed)] = (earlier_walls[str(seed)] if trained_before
                          else round(time.time() - start, 1))
      phase = _reported_phase(config)
      per_seed.append({k[len(phase) + 1:]: v for k, v in results.items()
                       if k.startswith(phase + "/") and isinstance(v, (int, float))})
      workdirs.append(str(workdir))
      command = (f"python -m fer_jax.main --config={module}:{arg} --workdir={workdir}")
    table[f"{row}/cpu_images_per_second"] = _cpu_images_per_second(config[phase], workdir)
    table[f"{row}/params"], table[f"{row}/macs"] = per_seed[-1]["params"], per_seed[-1]["macs"]
    # Split metrics vary with the seed; time is rows.json's wall_seconds_per_seed.
    for key in (k for k in per_seed[0] if "/" in k):
      values = np.array([r[key] for r in per_seed], np.float64)
      table[f"{row}/{key}"] = float(values.mean())
      if len(values) > 1:
        table[f"{row}/{key}_std"] = float(values.std(ddof=1))
    meta[row] = {"command": command, "arg": arg, "hardware": hardware.describe(),
                 "seeds": [str(s) for s in seeds],
                 "wall_seconds": round(float(np.mean(list(walls.values()))), 1),
                 "wall_seconds_per_seed": walls, "workdirs": workdirs,
                 "date": time.strftime("%Y-%m-%d")}
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
  from experiments import tables  # pylint: disable=g-import-not-at-top
  tables.write(suite, table, meta, out_dir)


def main(argv):
  del argv
  checkpoint.quiet_logs()
  options = [field for field, wanted in (("quick", _QUICK.value),
                                         (f"epochs={_EPOCHS.value}", _EPOCHS.value),
                                         (f"steps={_STEPS.value}", _STEPS.value)) if wanted]
  run_rows(_SUITE.value, _ROWS.value, [int(s) for s in _SEEDS.value], _WORKROOT.value,
           tuple(options))


if __name__ == "__main__":
  cli.run(main)
