"""The command lines' bad-input convention: the first line of the message, exit status 2."""
import pathlib
import subprocess
import sys

import pytest

from fer_jax import cli
from fer_jax.config_utils import ConfigError
from fer_jax.data.base import DataError


def test_report_prints_only_the_first_line_and_returns_2(capsys):
  assert cli.report(ValueError("data_dir: no such folder\nbuild it with prepare")) == 2
  assert capsys.readouterr().err == "error: data_dir: no such folder\n"


def test_an_empty_message_still_gives_one_line(capsys):
  cli.report(KeyError())
  assert capsys.readouterr().err == "error: KeyError()\n"


def test_fail_exits_with_status_2(capsys):
  with pytest.raises(SystemExit) as exited:
    cli.fail("--config.x: no such config field 'x'")
  assert exited.value.code == 2
  assert capsys.readouterr().err.splitlines() == ["error: --config.x: no such config field 'x'"]


@pytest.mark.parametrize("command, named", [
    (["fer_jax.main", "--config=configs/mkd.py", "--workdri=run"], "flag 'workdri'"),
    (["fer_jax.main", "--config=configs/mkd.py", "extra"], "unexpected arguments: extra"),
    (["fer_jax.evaluate", "--model=fer2013-student", "extra"], "unexpected arguments: extra"),
    (["fer_jax.evaluate", "--modle=x"], "flag 'modle'"),
    (["fer_jax.tools.count"], "--model"),
    (["fer_jax.convert.emonet_torch", "--nope"], "flag 'nope'"),
    (["experiments.run", "--suite=nope"], "--suite=nope"),
])
def test_absl_command_line_mistakes_are_one_line_with_exit_status_2(command, named):
  # absl alone prints its usage text and exits with status 1.
  done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                        check=False, cwd=pathlib.Path(__file__).parents[1])
  assert done.returncode == 2, done.stderr[-2000:]
  lines = [line for line in done.stderr.splitlines() if not line.startswith(("I1", "W1"))]
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], done.stderr


@pytest.mark.parametrize("error, line", [
    (DataError("fer2013.csv, line 3: unknown label 9\nmore"),
     "error: fer2013.csv, line 3: unknown label 9"),
    (ConfigError("config.data.name: unknown dataset 'x'"),
     "error: config.data.name: unknown dataset 'x'"),
    (KeyError("the caller's own type"), "error: \"the caller's own type\""),
    (FileNotFoundError("manual_dir /x does not exist\nexpected:\n..."),
     "error: manual_dir /x does not exist; the expected layouts: docs/datasets.md"),
])
def test_bad_input_exits_turns_bad_input_into_one_line_and_status_2(capsys, error, line):
  with pytest.raises(SystemExit) as exited, cli.bad_input_exits(KeyError):
    raise error
  assert exited.value.code == 2
  assert capsys.readouterr().err.splitlines() == [line]


def test_bad_input_exits_lets_other_errors_through():
  with pytest.raises(ZeroDivisionError), cli.bad_input_exits(KeyError):
    raise ZeroDivisionError("a bug, not bad input")
