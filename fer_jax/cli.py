"""Bad input on the command lines: one line on stderr naming it, and exit status 2.

fer_jax.main, fer_jax.evaluate, fer_jax.export and the experiments' commands share
this; fer_jax.predict reports each bad input on its own line, goes on with the others
and exits with status 2 at the end.
"""
import sys
from typing import NoReturn

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
  fail(f"{str(error).splitlines()[0]} (docs/datasets.md)")
