"""The CLI boundary: a UserError from any command is one line on stderr and its exit code, never a traceback."""

from sftkey import cli
from sftkey.data import DataError
from sftkey.errors import UserError


def test_user_error_becomes_one_line_and_exit_code(monkeypatch, capsys):
    def failing_run(args):
        raise DataError("train.jsonl line 3: no '####' answer marker; add one")

    monkeypatch.setitem(cli.COMMANDS, "boom", ("tests.test_errors", "test"))
    monkeypatch.setattr("tests.test_errors.add_arguments", lambda parser: None, raising=False)
    monkeypatch.setattr("tests.test_errors.run", failing_run, raising=False)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err == "sftkey boom: error: train.jsonl line 3: no '####' answer marker; add one\n"


def test_gate_failures_exit_1():
    from orchestration.pipeline import PipelineFailed
    from sftkey.train.trainer import TrainingError

    assert issubclass(PipelineFailed, UserError) and PipelineFailed.exit_code == 1
    assert issubclass(TrainingError, UserError) and TrainingError.exit_code == 1
    assert DataError.exit_code == 2
