"""The tests' tiny config (helpers.tiny_config) as a config file, for runs of the command line.

``--config=tests/tiny_config_file.py:STEPS`` sets the steps of each phase (default 4).
"""
from helpers import tiny_config


def get_config(arg=None):
  return tiny_config(steps_per_phase=int(arg or 4))
