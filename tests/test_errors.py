"""The CLI boundary: a UserError from any command is one line on stderr and its exit code, never a traceback."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

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


def test_the_console_script_and_the_in_process_runner_agree_on_a_bad_input(tmp_path, run_cli):
    """The one real `sftkey` process of the default suite: the installed entry point exits 2 with one line, and
    `run_cli` (which the other CLI tests use) reports exactly the same."""
    missing = tmp_path / "none.yaml"
    expected = f"sftkey train: error: {missing}: no such config file\n"
    script = Path(sys.executable).with_name("sftkey")
    real = subprocess.run([str(script), "train", "--config", str(missing)], capture_output=True, text=True,
                          timeout=120)
    assert (real.returncode, real.stdout, real.stderr) == (2, "", expected)
    result = run_cli("train", "--config", missing)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", expected)


def test_run_cli_undoes_what_a_command_changes_in_the_process(tmp_path, monkeypatch, run_cli):
    def meddling_run(args):
        os.environ["SFTKEY_TEST_LEFTOVER"] = "1"
        os.environ.pop("SFTKEY_TEST_KEPT")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logging.getLogger().addHandler(logging.NullHandler())
        os.chdir(tmp_path)
        print("done")
        return 3

    monkeypatch.setitem(cli.COMMANDS, "meddle", ("tests.test_errors", "test"))
    monkeypatch.setattr("tests.test_errors.add_arguments", lambda parser: None, raising=False)
    monkeypatch.setattr("tests.test_errors.run", meddling_run, raising=False)
    monkeypatch.setenv("SFTKEY_TEST_KEPT", "yes")
    handler, handlers, cwd = signal.getsignal(signal.SIGTERM), list(logging.getLogger().handlers), os.getcwd()
    result = run_cli("meddle", env={"SFTKEY_TEST_ONLY_HERE": "1"})
    assert (result.exit_code, result.stdout, result.stderr) == (3, "done\n", "")
    assert "SFTKEY_TEST_LEFTOVER" not in os.environ and "SFTKEY_TEST_ONLY_HERE" not in os.environ
    assert os.environ["SFTKEY_TEST_KEPT"] == "yes"
    assert signal.getsignal(signal.SIGTERM) is handler and logging.getLogger().handlers == handlers
    assert os.getcwd() == cwd


def test_run_cli_reports_usage_errors_as_the_process_would(run_cli):
    result = run_cli("train")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "sftkey train: error: the following arguments are required: --config"
