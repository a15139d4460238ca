"""Command line: ``python -m fer_jax.main --config=configs/mkd.py [--workdir=DIR]``.

Overrides use ml_collections syntax (``--config.student.batch_size=64``) and a
config argument follows the path (``--config=configs/mkd.py:smoke``). Without
``--workdir`` the run writes to ``workdirs/<config name>``. A config mistake
(an unknown key, argument, layer or model field) or bad data (a malformed or
missing download: the file, row and field) prints one line naming it and exits
with status 2.
"""
import contextlib
import pathlib
import re

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fer_jax import checkpoint, cli, train
from fer_jax.checkpoint import CheckpointError
from fer_jax.config_utils import ConfigError
from fer_jax.model_dir import ModelDirError
from fer_jax.models import layers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints and results "
                               "(default: workdirs/<config name>).")
# A cluster JAX detects (Cloud TPU, SLURM, Open MPI, ...) needs none of these;
# elsewhere every process gets the same address and count and its own id.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LAYER_FORMS = flags.DEFINE_enum(
    "layer_forms", "auto", ["auto", *layers.LAYER_FORMS],
    "Convolution and pooling formulations: 'cpu' (faster gradients on XLA:CPU; "
    "fer_jax.models.layers), 'native' (plain lax ops) or 'auto' (cpu on the CPU backend).")
flags.mark_flags_as_required(["config"])


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
    cli.fail(f"{given[0] if given else '--config'}: no such config field {field!r}" +
             (f"; did you mean {hint.group(1)!r}?" if hint else ""))
  except flags.UnrecognizedFlagError as e:  # not about --config: named as absl names it
    cli.fail(e)
  except (flags.Error, ConfigError, TypeError, ValueError) as e:
    cli.fail(_first_error(e))
  return []


def _raised_under(error: BaseException) -> BaseException | None:
  if error.__cause__ is not None:
    return error.__cause__
  return None if error.__suppress_context__ else error.__context__


def _first_error(error: BaseException) -> str:
  """The message of the error raised first under ``error``.

  config_flags re-raises a config file's error as a new one of the same type
  whose text is the traceback, and absl wraps that again; the first one says
  what is wrong.
  """
  while _raised_under(error) is not None:
    error = _raised_under(error)
  message = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
  return message if isinstance(error, ConfigError) else f"--config: {message}"


def start_processes() -> None:
  """Joins the multi-process run the flags name or JAX detects; else runs alone."""
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    # Raised when no cluster is detected: a single-host run.
    logging.info("single-host run (%s)", e)


def default_workdir(config) -> str:
  return str(pathlib.Path("workdirs") / str(config.get("name", "run")).replace("/", "_"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  checkpoint.quiet_logs()
  start_processes()
  logging.info("process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    config = _CONFIG.value
    default = default_workdir(config)  # reads the config: fails here if it did not load
    workdir = _WORKDIR.value or default
  except OSError as e:  # config_flags defers a config file it could not read to here
    del e
    cli.fail(f"--config: cannot load {config_flags.get_config_filename(flags.FLAGS['config'])}: "
             "no such file, or it cannot be imported")
  if jax.process_index() == 0:
    print(f"fer_jax: writing to {workdir}", flush=True)
  forms = (contextlib.nullcontext() if _LAYER_FORMS.value == "auto"
           else layers.force_layer_forms(_LAYER_FORMS.value))
  with cli.bad_input_exits(ModelDirError, CheckpointError), forms:
    train.train_and_evaluate(config, workdir)


def run():
  cli.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
