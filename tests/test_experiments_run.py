"""experiments/run.py's bookkeeping: rows and seeds filled in over several runs.

Three real runs of a row (about 2 minutes on 2 cores), so it is `slow`:
`python -m pytest -m slow tests/test_experiments_run.py`.
"""
import json

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
