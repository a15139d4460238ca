"""experiments/run.py's bookkeeping: rows and seeds filled in over several runs.

Three real runs of a row (about 2 minutes on 2 cores), so it is `slow`:
`python -m pytest -m slow tests/test_experiments_run.py`.
"""
import json
import pathlib

import numpy as np
import pytest

from experiments import run


@pytest.mark.slow
def test_a_seed_added_later_keeps_the_first_seeds_wall_time_and_is_averaged(tmp_path):
  workroot, out = str(tmp_path / "work"), tmp_path / "out"
  options = ("quick", "steps=2")
  run.run_rows("synthetic", ["student_alone"], [0], workroot, options, out)
  first = json.loads((out / "rows.json").read_text())["student_alone"]

  run.run_rows("synthetic", ["student_alone"], [0, 1], workroot, options, out)
  meta = json.loads((out / "rows.json").read_text())["student_alone"]
  table = json.loads((out / "results.json").read_text())

  walls = meta["wall_seconds_per_seed"]
  assert set(walls) == {"0", "1"}
  # Seed 0 was only re-evaluated from its checkpoint the second time.
  assert walls["0"] == first["wall_seconds_per_seed"]["0"]
  assert meta["wall_seconds"] == pytest.approx((walls["0"] + walls["1"]) / 2, abs=0.05)
  assert meta["seeds"] == ["0", "1"]
  per_seed = [json.loads((tmp_path / "work" / "synthetic" / f"student_alone_s{s}" /
                          "results.json").read_text())["student/test/accuracy"] for s in (0, 1)]
  assert table["student_alone/test/accuracy"] == pytest.approx(np.mean(per_seed))
  # Sample standard deviation of two values: |a - b| / sqrt(2).
  assert table["student_alone/test/accuracy_std"] == pytest.approx(
      abs(per_seed[0] - per_seed[1]) / np.sqrt(2))
  assert "params_std" not in {k.split("/", 1)[1] for k in table}
  assert table["student_alone/cpu_images_per_second"] > 0
  assert "| student_alone (quick, CPU) |" in (out / "results.md").read_text()
  assert "seeds 0,1" in (out / "results.md").read_text()


def test_occluder_box_on_the_attention_grid_is_the_covered_fraction():
  from experiments import attention_mass  # pylint: disable=g-import-not-at-top
  clean = np.zeros((2, 48, 48, 1), np.uint8)
  occluded = clean.copy()
  occluded[0, :16, :16] = 255  # exactly the top-left cell of a 3x3 grid
  occluded[1, 8:24, 40:] = 9  # half of the top-right cell, half of the right-middle cell
  box = np.asarray(attention_mass.box_on_grid(clean, occluded, (3, 3)))
  expected = np.zeros((2, 3, 3))
  expected[0, 0, 0] = 1.0
  expected[1, 0, 2] = expected[1, 1, 2] = 0.5 * 0.5
  np.testing.assert_allclose(box, expected)


def test_cpu_tier_groups_seeds_by_row_family_with_the_sample_std():
  from experiments import cpu_tier  # pylint: disable=g-import-not-at-top
  rows = {"student alone": {"acc": 0.7773, "macs": 7e6},
          "MKD": {"acc": 0.8008, "macs": 7e6},
          "student alone, seed 1": {"acc": 0.7859, "macs": 7e6},
          "student alone, seed 2": {"acc": 0.7700, "macs": 7e6}}
  families = cpu_tier.seed_families(rows, "acc")
  assert list(families) == ["student alone", "MKD"]
  assert families["student alone"][0] == pytest.approx([77.73, 78.59, 77.00])
  summary = cpu_tier.seed_summary(rows, "acc", "Test")
  alone = [77.73, 78.59, 77.00]
  assert f"* student alone: {np.mean(alone):.2f} ± {np.std(alone, ddof=1):.2f} % (3 seeds)" \
      in summary
  assert not any(line.startswith("* MKD") for line in summary)  # one seed: no spread


def test_cpu_tier_front_is_the_points_no_cheaper_point_matches():
  from experiments import cpu_tier  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  points = [(float(c), float(a)) for c, a in
            zip(rng.choice([7.5, 9.4, 29.5, 74.0], 30), rng.integers(55, 70, 30))]
  # Brute force: dominated when another point costs no more and scores no less, and is
  # strictly better in one of the two (or an equal duplicate earlier in the list).
  expected = {p for i, p in enumerate(points) if not any(
      q[0] <= p[0] and q[1] >= p[1] and (q != p or j < i) for j, q in enumerate(points)
      if j != i)}
  front = cpu_tier.pareto_front(points)
  assert set(front) == expected and len(front) == len(expected)
  assert [a for _, a in front] == sorted(a for _, a in front)  # dearer points score higher


def test_cpu_tier_kinds_tell_teachers_probes_and_taught_students_apart():
  from experiments import cpu_tier  # pylint: disable=g-import-not-at-top
  kinds = {name: cpu_tier.row_kind(phase, command)
           for name, (_, phase, command) in cpu_tier.ROWS.items()}
  assert kinds["AFNet teacher (VGG width 16)"] == "teacher"
  assert kinds["student alone"] == kinds["VGG width 9 alone, 60 epochs"] == "student alone"
  assert kinds["Hinton KD"] == kinds["AT"] == "distilled student"
  assert kinds["ASDC linear probe, self-supervised teacher"] == "ASDC linear probe"
  assert set(kinds.values()) | {cpu_tier.BASELINE_KIND} == set(cpu_tier.KIND_STYLES)


def test_device_pack_gives_back_the_trainers_arrays_and_catches_other_faces(tmp_path):
  from experiments import device_run  # pylint: disable=import-outside-toplevel
  from fer_jax import config_utils, train  # pylint: disable=import-outside-toplevel
  data_cfg = config_utils.data_config("synthetic")
  data_cfg.split_sizes = {"train": 40, "validation": 12, "test": 12}
  path = tmp_path / "pack.npz"
  device_run.pack(data_cfg, path)
  dataset, arrays = train.load_data(data_cfg)
  packed = device_run.unpack(path)
  assert packed.class_names == dataset.class_names
  for split, fields in arrays.items():
    restored = packed.split(split).arrays
    assert set(restored) == set(fields)
    for key, value in fields.items():
      np.testing.assert_array_equal(restored[key], value)
      assert restored[key].dtype == value.dtype
  # A pack whose faces changed after packing is refused, not trained on.
  content = dict(np.load(path))
  content["test.sha256"] = np.array("0" * 64)
  np.savez(path, **content)
  with pytest.raises(ValueError, match="split 'test' decodes to other faces"):
    device_run.unpack(path)


@pytest.mark.parametrize("seconds_left, epochs", [(1000.0, 40), (500.0, 20)])
def test_device_run_takes_the_configs_epochs_when_they_fit_else_pays_the_recompile(
    monkeypatch, seconds_left, epochs):
  from experiments import device_run  # pylint: disable=import-outside-toplevel
  from configs import mkd  # pylint: disable=import-outside-toplevel
  config = mkd.get_config("data=fer2013,tier=full")
  timings = {"teacher": {"compile_s": 30.0, "step_s": 0.05},
             "student": {"compile_s": 20.0, "step_s": 0.03}}
  monkeypatch.setattr(device_run.train_step, "time_phase", lambda c, name, n: timings[name])
  monkeypatch.setattr(device_run.train, "load_data", lambda data_cfg: (
      None, {"train": {"label": np.zeros(28709)}}))
  chosen, plan = device_run.epochs_that_fit(config, seconds_left)
  # 224 steps an epoch: 224 * (0.05 + 0.03) = 17.92 s. 40 epochs and 2 * 45 s fit in
  # 1000 s; in 500 s fewer epochs fit once both steps compile again: (500 - 140) / 17.92 = 20.1.
  assert plan["seconds_per_epoch"] == pytest.approx(17.92)
  assert chosen == epochs


def test_device_train_without_its_pack_is_one_line_and_exit_status_2(tmp_path):
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  missing = tmp_path / "absent_pack.npz"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.device_run", "train", "--config=configs/mkd.py:smoke",
       f"--pack={missing}", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1], check=False)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: --pack={missing}: no such file; write it with the pack command first")
  assert not (tmp_path / "run").exists()
