"""The tests' tiny config (helpers.tiny_config) as a config file, for runs of the command line.

``--config=tests/tiny_config_file.py:ARGS``, ARGS a comma-separated list of: the steps of
each phase (default 4); ``teacher_only``, which drops the student phase.
"""
from helpers import tiny_config


def get_config(arg=None):
  args = arg.split(",") if arg else []
  unknown = [a for a in args if not a.isdigit() and a != "teacher_only"]
  if unknown:
    raise ValueError(f"tests/tiny_config_file.py: unknown arguments {unknown}; "
                     "expected the steps of each phase or teacher_only")
  steps = [int(a) for a in args if a.isdigit()]
  config = tiny_config(steps_per_phase=steps[0] if steps else 4)
  if "teacher_only" in args:
    config.phases = ("teacher",)
    del config["student"]
  return config
