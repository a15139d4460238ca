"""Writes experiments/<suite>/results.md and its plots from the rows' results."""
import json
import pathlib

import numpy as np

from configs import common
from experiments import rows as rows_lib

HERE = pathlib.Path(__file__).resolve().parent
OCCLUDERS = ("eyes", "mouth", "blocks", "hand")
SPLITS = {
    "fer2013": ("private_test", ()),
    "ferplus": ("test", ("test_occlusion", "test_pose30", "test_pose45")),
    "synthetic": ("test", ()),
}
TARGETS = {
    "fer2013": "Targets: teacher >= 74.5 %, a student with <= 1/10 of its MACs >= 72.5 %, "
               "occlusion drop <= 3 points, ASDC linear probe >= 64 %.",
    "ferplus": "Targets: teacher >= 88 %, student >= 86 % (majority labels); "
               "Occlusion-FERPlus >= 85 %.",
    "synthetic": "The embedded procedural faces (fer_jax/data/synthetic.py), the configs' "
                 "default schedules. Target (issue 2): MKD student >= 90 %.",
}


def _pct(table, key):
  value = table.get(key)
  if value is None:
    return "-"
  std = table.get(key + "_std")
  return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


# Rows measured by their own scripts, shown in a suite's table beside the trained rows.
COMPARISON_ROWS = {"fer2013": HERE / "fer_package" / "results.json"}


def write(suite: str, table: dict, meta: dict, out: pathlib.Path | None = None) -> None:
  """Writes results.md and the plots into ``out`` (default experiments/<suite>)."""
  test, extra = SPLITS[suite]
  out = out or HERE / suite
  meta = {row: meta[row] for row in _in_row_order(meta, meta)}
  plots = _plots(suite, meta, table, out)
  comparison = COMPARISON_ROWS.get(suite)
  if comparison is not None and comparison.is_file():
    measured = json.loads(comparison.read_text())
    table, meta = {**measured["table"], **table}, {**meta, **measured["meta"]}
  rows = _in_row_order({k.split("/")[0] for k in table}, meta)
  head = (["row", "params", "MMACs", "CPU img/s", f"{test} acc", "mean-class acc"]
          + [f"occl. {o}" for o in OCCLUDERS] + ["occl. mean", "drop"]
          + [s for s in extra] + ["wall s"])
  lines = [f"# {suite}: reproduction table", "",
           "Accuracy in % on the test split (models selected on the validation split only). "
           "`occl.` columns: the same test images under the fixed synthetic occluders of "
           "docs/occlusion_protocol.md (seed 0); `drop` = clean minus occluded mean. "
           "`CPU img/s`: the reported model's inference throughput on the host CPU, batch "
           "64 (`fer_jax.tools.count.cpu_images_per_second`). `wall s`: one seed's run, "
           "training and every evaluation (mean over seeds).", "",
           TARGETS[suite], "",
           "Rows marked `quick` use the 2-core CPU budget of experiments/README.md (small "
           f"strided-stem models, at most {common.QUICK_EPOCHS} epochs a phase "
           f"({common.QUICK_CONTRASTIVE_EPOCHS} for contrastive pre-training), occluders "
           "and flips as the only augmentation), not the papers' recipe.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    clean = table.get(f"{row}/{test}/accuracy")
    occluded = table.get(f"{row}/{test}_occluded/accuracy")
    drop = f"{100 * (clean - occluded):.2f}" if clean is not None and occluded else "-"
    params = table.get(f"{row}/params")
    macs = table.get(f"{row}/macs")
    quick = "quick" in meta.get(row, {}).get("arg", "").split(",")
    cells = [f"{row} (quick, CPU)" if quick else row, f"{params / 1e6:.2f} M" if params else "-",
             f"{macs / 1e6:.1f}" if macs else "-",
             f"{table[f'{row}/cpu_images_per_second']:.0f}"
             if f"{row}/cpu_images_per_second" in table else "-",
             _pct(table, f"{row}/{test}/accuracy"),
             _pct(table, f"{row}/{test}/mean_class_accuracy")]
    cells += [_pct(table, f"{row}/{test}_occluded_{o}/accuracy") for o in OCCLUDERS]
    cells += [_pct(table, f"{row}/{test}_occluded/accuracy"), drop]
    cells += [_pct(table, f"{row}/{s}/accuracy") for s in extra]
    cells.append(str(meta.get(row, {}).get("wall_seconds", "-")))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Commands", ""]
  for row, info in meta.items():
    lines += [f"- `{row}` ({info['hardware']}, seeds {','.join(info['seeds'])}, "
              f"{info['date']}): `{info['command']}`"]
  if plots:
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  (out / "results.md").write_text("\n".join(lines) + "\n")


def _in_row_order(names, meta: dict) -> list[str]:
  """experiments.rows order (teacher, its ablations, students, probe), then the others as run."""
  known, run = list(rows_lib.ROWS), list(meta)
  return sorted(names, key=lambda row: (known.index(row) if row in known else len(known),
                                        run.index(row) if row in run else len(run)))


def _best_student(suite: str, meta: dict, table: dict) -> str | None:
  """The trained student row with the highest test accuracy among those that compress.

  A student costlier than the teacher (the quick ``tb_cls`` EfficientFormer-L1
  at 48 px) is a row of the table, not the small model the targets ask for.
  """
  test = SPLITS[suite][0]
  budget = table.get("teacher/macs", float("inf"))
  students = [row for row in meta if not row.startswith("teacher") and "workdirs" in meta[row]
              and f"{row}/{test}/accuracy" in table
              and table.get(f"{row}/macs", 0) <= budget]
  return max(students, key=lambda row: table[f"{row}/{test}/accuracy"], default=None)


def _plots(suite: str, meta: dict, table: dict, out: pathlib.Path) -> list[str]:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  made = []
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  colours = plt.get_cmap("tab20").colors  # more rows than the default cycle's 10 colours
  for i, (row, info) in enumerate(meta.items()):
    path = pathlib.Path(info["workdirs"][0]) / "metrics.jsonl"
    if not path.exists():
      continue
    records = [json.loads(line) for line in path.read_text().splitlines()]
    phase = records[-1]["phase"]
    train_rec = [r for r in records if r["phase"] == phase and "loss" in r]
    eval_rec = [r for r in records if r["phase"] == phase and "split" in r]
    style = dict(label=row, color=colours[i % len(colours)],
                 linestyle="--" if row.startswith("teacher") else "-")
    if train_rec:
      ax_loss.plot([r["step"] for r in train_rec], [r["loss"] for r in train_rec], **style)
    if eval_rec:
      ax_acc.plot([r["step"] for r in eval_rec], [r["accuracy"] for r in eval_rec], **style)
  ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
  ax_acc.set(xlabel="step", ylabel="validation accuracy")
  ax_acc.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "learning_curves.png", dpi=90)
  plt.close(fig)
  made.append("learning_curves.png")
  for stale in out.glob("confusion_*.png"):  # the best student may have changed
    stale.unlink()
  for row in filter(None, (_best_student(suite, meta, table), "teacher")):
    details_path = pathlib.Path(meta.get(row, {}).get("workdirs", [""])[0]) / "details.json"
    if details_path.is_file():
      details = json.loads(details_path.read_text())
      phase = list(details["phases"])[-1]
      confusion = np.array(next(iter(details["phases"][phase]["confusion"].values())))
      names = details["class_names"]
      fig, ax = plt.subplots(figsize=(5.5, 5))
      normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
      ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
      for (i, j), c in np.ndenumerate(confusion):
        ax.text(j, i, str(c), ha="center", va="center", fontsize=7)
      ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
      ax.set_yticks(range(len(names)), names, fontsize=7)
      ax.set(xlabel="predicted", ylabel="true", title=f"{row}: {phase}")
      fig.tight_layout()
      fig.savefig(out / f"confusion_{row}.png", dpi=90)
      plt.close(fig)
      made.append(f"confusion_{row}.png")
  if "teacher" in meta and "arg" in meta["teacher"] and \
      _attention_plot(suite, meta["teacher"], plt, out):
    made.append("attention_maps.png")
  return made


def _attention_plot(suite, teacher_meta, plt, out: pathlib.Path) -> bool:
  """The AFNet teacher's region-attention maps on occluded test faces."""
  from fer_jax import model_dir, train  # pylint: disable=g-import-not-at-top
  from fer_jax.data import occlusion  # pylint: disable=g-import-not-at-top
  saved = pathlib.Path(teacher_meta["workdirs"][0]) / "teacher" / "model"
  if not saved.is_dir():
    return False
  teacher = model_dir.load(saved)
  config = rows_lib.row_config(suite, teacher_meta["arg"])
  _, arrays = train.load_data(config.data)
  test = arrays[config.data.test_split]
  images = test["image"][:4]
  indices = test["index"][:4]
  fig, axes = plt.subplots(len(OCCLUDERS), 1 + 2 * len(images), figsize=(13, 7))
  for r, kind in enumerate(OCCLUDERS):
    occluded = np.asarray(occlusion.occlude_fixed(images, indices, kind, seed=0))
    _, aux = teacher.module().apply(teacher.variables, teacher.preprocess(occluded),
                                    train=False)
    maps = np.asarray(aux["att_map"]).mean(-1)
    weights = np.asarray(aux["region_weights"])
    axes[r, 0].set_ylabel(kind)
    for i in range(len(images)):
      axes[r, 2 * i].imshow(occluded[i, ..., 0], cmap="gray")
      axes[r, 2 * i + 1].imshow(maps[i], cmap="magma")
      axes[r, 2 * i + 1].set_title("w=" + ",".join(f"{w:.2f}" for w in weights[i]), fontsize=6)
    axes[r, -1].axis("off")
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle("AFNet teacher: occluded face | mean region-attention map (region weights)")
  fig.tight_layout()
  fig.savefig(out / "attention_maps.png", dpi=80)
  plt.close(fig)
  return True
