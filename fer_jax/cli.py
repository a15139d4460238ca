"""Bad input on the command lines: one line on stderr naming it, and exit status 2.

fer_jax.main, fer_jax.evaluate, fer_jax.export and the experiments' commands share
this, and the absl ones start through ``run``, so a mistyped flag or a stray argument
is such a line too; fer_jax.predict reports each bad input on its own line, goes on
with the others and exits with status 2 at the end.
"""
import contextlib
import sys
from typing import NoReturn

from absl import app, flags

from fer_jax.config_utils import ConfigError
from fer_jax.data.base import DataError

EXIT_BAD_INPUT = 2


def report(message: object) -> int:
  """Prints the first line of ``message`` as the error; returns ``EXIT_BAD_INPUT``."""
  lines = str(message).splitlines() or [repr(message)]
  print(f"error: {lines[0]}", file=sys.stderr)
  return EXIT_BAD_INPUT


def fail(message: object) -> NoReturn:
  sys.exit(report(message))


def fail_missing_data(error: FileNotFoundError) -> NoReturn:
  """A dataset neither built nor downloaded: the error's first line, and where the
  expected download layouts are described."""
  fail(f"{str(error).splitlines()[0]}; the expected layouts: docs/datasets.md")


@contextlib.contextmanager
def bad_input_exits(*errors: type[Exception]):
  """Inside it, a config mistake, malformed data, one of the caller's ``errors`` or a
  dataset neither built nor downloaded (FileNotFoundError) is one line and exit status 2."""
  try:
    yield
  except (ConfigError, DataError, *errors) as e:
    fail(e)
  except FileNotFoundError as e:
    fail_missing_data(e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag mistake as one line and exit status 2 (absl: 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)


def run(main, flags_parser=parse_flags) -> None:
  """``app.run`` whose flag mistakes and usage errors are one line with exit status 2
  (absl prints its usage text and exits with 1): every absl command line here."""

  def main_reporting_usage_errors(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e)

  app.run(main_reporting_usage_errors, flags_parser=flags_parser)
