"""Command line: ``python -m fer_jax.main --config=configs/mkd.py [--workdir=DIR]``.

Overrides use ml_collections syntax (``--config.student.batch_size=64``) and a
config argument follows the path (``--config=configs/mkd.py:smoke``). Without
``--workdir`` the run writes to ``workdirs/<config name>``. A config mistake
(an unknown key, argument, layer or model field) prints one line naming it
and exits with status 2.
"""
import pathlib
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fer_jax import checkpoint, train
from fer_jax.config_utils import ConfigError
from fer_jax.model_dir import ModelDirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints and results "
                               "(default: workdirs/<config name>).")
flags.mark_flags_as_required(["config"])


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config mistakes made while it loads the config as one line.

  The config file runs and the ``--config.*`` overrides apply during parsing;
  an override of a key the locked config lacks raises AttributeError or
  KeyError there, not a flags.Error.
  """
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    # An override of a field the locked config lacks: ml_collections names the
    # field first in its message, then may suggest a near name.
    message = str(e.args[0] if e.args else e)
    field = re.search(r"[A-Za-z_]\w*", message).group(0)
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and
             field in a.split("=")[0].split(".")]
    hint = re.search(r"Did you mean \W*(\w+)", message)
    fail(f"{given[0] if given else '--config'}: no such config field {field!r}" +
         (f"; did you mean {hint.group(1)!r}?" if hint else ""))
  except (flags.Error, ConfigError, TypeError, ValueError) as e:
    cause = _innermost_config_error(e)
    fail(str(cause) if cause else f"command line: {str(e).splitlines()[0]}")
  return []


def _innermost_config_error(error: BaseException | None) -> ConfigError | None:
  """The first ConfigError raised under ``error``: config_flags re-raises a config
  file's errors as new ones of the same type with the traceback as their text."""
  found = None
  while error is not None:
    if isinstance(error, ConfigError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def default_workdir(config) -> str:
  return str(pathlib.Path("workdirs") / str(config.get("name", "run")).replace("/", "_"))


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
  workdir = _WORKDIR.value or default_workdir(_CONFIG.value)
  if jax.process_index() == 0:
    print(f"fer_jax: writing to {workdir}", flush=True)
  try:
    train.train_and_evaluate(_CONFIG.value, workdir)
  except (ConfigError, ModelDirError) as e:
    fail(str(e))


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
