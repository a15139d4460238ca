"""The terminal summary printed at the end of a run."""
import ml_collections

from fer_jax import report


def test_summary_shows_each_phase_clean_occluded_and_va():
  config = ml_collections.ConfigDict({
      "data": {"test_split": "private_test"}, "phases": ("teacher", "student", "probe"),
      "teacher": {"model": "afnet"}, "student": {"model": "mobilenet_v2"},
      "probe": {"model": "linear_probe"}})
  results = {"teacher/private_test/accuracy": 0.7453, "teacher/private_test_occluded/accuracy": 0.7,
             "student/private_test/accuracy": 0.5, "student/private_test/valence_ccc": 0.91234,
             "student/private_test/arousal_ccc": 0.8, "teacher/params": 11_000_000}
  assert report.summary(config, results).splitlines() == [
      "teacher (afnet): 74.53% private_test, 70.00% occluded",
      "student (mobilenet_v2): 50.00% private_test, valence CCC 0.912, arousal CCC 0.800",
      "probe (linear_probe): no evaluation"]
