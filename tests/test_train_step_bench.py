"""experiments/benchmarks/train_step.py: its config overrides and interleaved timing."""
import pathlib
import sys

import jax.numpy as jnp
import pytest
from absl import app

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))
# A repo module, imported, never skipped: its breakage must fail the tests.
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import mkd  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_overrides_set_typed_values_on_a_copy():
  config = mkd.get_config("smoke")
  changed = train_step.with_overrides(
      config, "student.teacher_dtype='bfloat16', student.batch_size=8")
  assert changed.student.teacher_dtype == "bfloat16" and changed.student.batch_size == 8
  assert config.student.teacher_dtype == "float32" and config.student.batch_size != 8


def test_unknown_override_is_one_short_usage_error():
  with pytest.raises(app.UsageError, match=r"cannot set student\.nope=3") as error:
    train_step.with_overrides(mkd.get_config("smoke"), "student.nope=3")
  assert "Other fields" not in str(error.value)


def test_cases_run_in_interleaved_rounds(monkeypatch):
  """Every case is warmed up first; then each round runs every case's share in turn."""
  calls = []

  def fake_compiled_phase(config, name):
    def step_fn(state, *inputs):
      calls.append(config)
      return state, {"loss": jnp.zeros(())}
    return step_fn, {}, (), 0.5, 16

  monkeypatch.setattr(train_step, "compiled_phase", fake_compiled_phase)
  results = train_step.time_phases([("a", "student"), ("b", "student")], num_steps=4,
                                   rounds=2)
  assert "".join(calls) == "ab" + "aabb" * 2
  assert [r["batch"] for r in results] == [16, 16] and results[0]["compile_s"] == 0.5
