"""Command line: ``python -m fer_jax.main --config=configs/mkd.py --workdir=DIR``.

Overrides use ml_collections syntax (``--config.student.batch_size=64``) and a
config argument follows the path (``--config=configs/mkd.py:smoke``).
"""
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fer_jax import checkpoint, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  checkpoint.quiet_logs()
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    # Raised when no cluster is detected: a single-host run.
    logging.info("single-host run (%s)", e)
  logging.info("process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  try:
    app.run(main)
  except (KeyError, AttributeError, ValueError) as e:
    # Config mistakes (unknown keys, bad names) get one line, not a traceback.
    if "config" in str(e) or "unknown" in str(e) or "does not exist" in str(e):
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  run()
