"""The command lines' bad-input convention: the first line of the message, exit status 2."""
import pytest

from fer_jax import cli


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
