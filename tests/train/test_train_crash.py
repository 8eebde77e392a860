"""Crash hygiene of `sftkey train`: real processes killed by PID, storage faults left by a crash, one run per folder.

A resumed run must end with the weights of an uninterrupted one (bit for bit) and a metrics.jsonl holding each
step once; a fault in the newest checkpoint falls back to the previous one and says so; a second process on the
same run folder refuses in one line.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftkey.atomic import write_text
from sftkey.train import checkpoint as ckpt
from sftkey.train.layout import run_root
from sftkey.train.tracking import JsonlTracker, MetricsFileError, read_metrics
from sftkey.train.trainer import RunStateError, _lock_run, refuse_if_training, train_arm

from test_trainer import CrashAt

REPO = Path(__file__).resolve().parents[2]
ARITH = Path(__file__).resolve().parent / "fixtures" / "arith.jsonl"
TWO_STAGES = {"sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 4},
                                                           {"name": "stage2", "loss": "key", "steps": 4}]}}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(expected_folder, got_folder) -> None:
    expected, got = weights(expected_folder), weights(got_folder)
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []


def steps_and_losses(run) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(run / "metrics.jsonl")]


def checkpoint_names(run) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sftkey.train" and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- storage faults a crash leaves


def _cut_metrics_line(run: Path) -> str:
    cut = '{"type": "metrics", "step": 8, "lo'  # a line the kill cut short
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(cut)
    return f"{run / 'metrics.jsonl'}: dropped a last line cut by a crash ({len(cut)} bytes)"


def _empty_file(name: str):
    def fault(run: Path) -> str:
        newest = run / "checkpoints" / "step-00000006"
        (newest / name).write_bytes(b"")
        problem = f"{name} is cut (0 bytes)" if name.endswith(".safetensors") else f"{name} is not a complete torch file (0 bytes)"
        return (f"checkpoint {newest} does not load ({problem}): moved aside to .step-00000006.bad; "
                "resuming from step-00000005")
    return fault


def _cut_in_half(run: Path) -> str:
    path = run / "checkpoints" / "step-00000006" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"model.safetensors is {len(data) // 2} bytes, its header says {len(data)}"


FAULT_CHANGES = {"arms": TWO_STAGES, "train": {"save_every": 1, "keep_last": 2}}


@pytest.fixture(scope="module")
def killed_at_step_7(config_at, tmp_path_factory) -> tuple[Path, Path]:
    """(straight run's final checkpoint, a run killed after step 7's update): trained once, copied by each case."""
    root = tmp_path_factory.mktemp("fault")
    straight = train_arm(config_at(FAULT_CHANGES, root / "straight"), "sftkey_tag", 0)
    with pytest.raises(KeyboardInterrupt):
        train_arm(config_at(FAULT_CHANGES, root / "killed"), "sftkey_tag", 0, tracker=CrashAt(7))
    return straight, root / "killed"


@pytest.mark.parametrize("fault", [
    pytest.param(_cut_metrics_line, id="cut-metrics-line"), pytest.param(_empty_file("model.safetensors"), id="empty-model"),
    pytest.param(_empty_file("optimizer.pt"), marks=pytest.mark.slow, id="empty-optimizer"),  # the same fallback path
    pytest.param(_cut_in_half, marks=pytest.mark.slow, id="cut-model")])
def test_resume_after_a_storage_fault_falls_back_and_ends_bit_identical(make_config, tmp_path, caplog, fault,
                                                                         killed_at_step_7):
    straight, killed = killed_at_step_7
    shutil.copytree(killed, tmp_path / "killed")
    config = make_config(FAULT_CHANGES, tmp_path / "killed")
    run = tmp_path / "killed" / "sftkey_tag" / "seed0"
    assert checkpoint_names(run) == ["stage1-final", "step-00000005", "step-00000006"]
    said = fault(run)
    caplog.set_level(logging.INFO, logger="sftkey.train")
    resumed = train_arm(config, "sftkey_tag", 0, resume=True)
    assert_same_weights(straight, resumed)
    assert steps_and_losses(run) == steps_and_losses(run_root(straight))
    assert [step for step, _ in steps_and_losses(run)] == list(range(1, 9))
    told = warnings_of(caplog)
    trimmed = f"{run / 'metrics.jsonl'}: dropped %d metrics lines past step %d (logged again by this run)"
    if fault is _cut_metrics_line:
        assert told == [said, trimmed % (1, 6)]
    else:
        assert len(told) == 2 and said in told[0]  # the fallback, then the metrics past step 5 that run again
        assert told[1] == trimmed % (2, 5)
        assert (run / "checkpoints" / ".step-00000006.bad" / ckpt.META_FILE).exists()  # kept for a look
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_checkpoint_without_readable_meta_is_moved_aside_and_named(make_config, tmp_path, caplog):
    config = make_config({"train": {"save_every": 1, "keep_last": 2}})
    with pytest.raises(KeyboardInterrupt):
        train_arm(config, "sft_tag", 0, tracker=CrashAt(3))
    run = tmp_path / "runs" / "sft_tag" / "seed0"
    (run / "checkpoints" / "step-00000002" / ckpt.META_FILE).write_text('{"arm": "sft_t')
    caplog.set_level(logging.INFO, logger="sftkey.train")
    train_arm(config, "sft_tag", 0, resume=True)
    assert warnings_of(caplog)[0] == (f"checkpoint {run / 'checkpoints' / 'step-00000002'} does not load (no readable "
                                      "sftkey.json): moved aside to .step-00000002.bad; resuming from step-00000001")
    assert [step for step, _ in steps_and_losses(run)] == [1, 2, 3]


def test_a_run_killed_before_any_checkpoint_keeps_no_steps_of_its_own(make_config, tmp_path, caplog):
    """No checkpoint: every step runs again, so every metrics line of the dead run goes (with or without --resume),
    and a run.json that a SIGKILL left "running" is marked interrupted by the next run."""
    config = make_config()
    straight = train_arm(make_config({}, tmp_path / "straight"), "sft_tag", 0)
    for resume in (True, False):
        with pytest.raises(KeyboardInterrupt):
            train_arm(config, "sft_tag", 0, tracker=CrashAt(2))
        run = tmp_path / "runs" / "sft_tag" / "seed0"
        assert checkpoint_names(run) == [] and [step for step, _ in steps_and_losses(run)] == [1, 2]
        record = json.loads((run / "run.json").read_text())
        write_text(run / "run.json", json.dumps(record | {"status": "running"}))  # as kill -9 leaves it
        caplog.clear()
        caplog.set_level(logging.INFO, logger="sftkey.train")
        assert_same_weights(straight, train_arm(config, "sft_tag", 0, resume=resume))
        assert warnings_of(caplog) == [
            f"{run / 'run.json'}: the previous run (pid {os.getpid()} on {socket.gethostname()}) died while running; "
            "marked interrupted",
            f"{run / 'metrics.jsonl'}: dropped 2 metrics lines past step 0 (logged again by this run)"]
        assert steps_and_losses(run) == steps_and_losses(tmp_path / "straight" / "sft_tag" / "seed0")
        shutil.rmtree(run / "checkpoints")


def test_a_bad_line_before_the_last_is_an_error_not_a_guess(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "metrics", "step": 1}\nnot json\n{"type": "metrics", "step": 2}\n')
    with pytest.raises(MetricsFileError, match=rf"^{path} line 2: not a JSON object; only a crash's last line"):
        JsonlTracker(path).drop_metrics_after(0)
    path.write_text('{"type": "metrics", "step": 1}\n{"type": "metrics", "step": 2}\n{"type": "met')
    assert [row["step"] for row in read_metrics(path)] == [1, 2]  # readers skip the cut line too
    assert JsonlTracker(path).drop_metrics_after(1) == [
        f"{path}: dropped a last line cut by a crash (13 bytes)",
        f"{path}: dropped 1 metrics lines past step 1 (logged again by this run)"]
    assert path.read_text() == '{"type": "metrics", "step": 1}\n'
    assert JsonlTracker(path).drop_metrics_after(1) == []  # nothing to do: the file is left as it is


# --------------------------------------------------------------------------- the run folder's lock


def test_the_lock_refuses_a_second_holder_and_ignores_a_dead_ones_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text("pid 999999 on a-dead-host\n")  # left by a process killed with SIGKILL
    first = _lock_run(run, 0)  # a flock dies with its process, so the stale file does not block
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    assert (run / "run.lock").read_text() == me + "\n"
    with pytest.raises(RunStateError) as refused:
        _lock_run(run, 0)  # flock is per open file: even the same process is refused
    assert str(refused.value) == (f"{run}: another sftkey train ({me}) is training this run folder; wait for it to "
                                  "finish or stop it, then rerun with --resume")
    _lock_run(run, 1).close()  # another rank of the same job has its own file
    with pytest.raises(RunStateError) as asked:
        refuse_if_training(run)  # the check made before an MLflow run exists: same refusal, nothing held
    assert str(asked.value) == str(refused.value)
    first.close()
    refuse_if_training(run)  # released: passes, and takes nothing
    refuse_if_training(tmp_path / "never-trained")
    assert (run / "run.lock").read_text() == me + "\n" and not (tmp_path / "never-trained").exists()
    _lock_run(run, 0).close()


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "run.json"
    write_text(target, "{}\n")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".run.json.")) and events[2][1] == str(tmp_path)
    assert target.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


# --------------------------------------------------------------------------- real processes, killed by PID


# ~1.5 s of steps here: a run frozen after its first step is still training, under any CI load
TWENTY_STEPS = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 20}]}}


def write_config(tmp_path: Path, tiny_model_dir: Path, output_dir: Path, arms: dict, train: dict | None = None) -> Path:
    """A YAML config for the CLI, as tests/train/conftest.py BASE with these arms and train settings."""
    raw = {"model": str(tiny_model_dir), "output_dir": str(output_dir), "seeds": [0],
           "data": {"dataset": "gsm8k", "path": str(ARITH), "max_length": 256},
           "train": {"batch_size": 4, "lr": 1.0e-3, "warmup_epochs": 0.5, "pack_length": 512} | (train or {}),
           "arms": arms}
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_train(config: Path, *extra: str) -> subprocess.Popen:
    # not the store an earlier test pointed MLFLOW_TRACKING_URI at (mlflow.set_tracking_uri sets it): --tracking-uri
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1",
                                                                                  "PYTHONPATH": str(REPO)}
    # a shell that started the suite in the background ignores SIGINT, and children inherit that: undo it, so that
    # SIGINT reaches `sftkey train` as Ctrl-C does
    return subprocess.Popen([sys.executable, "-m", "sftkey.cli", "train", "--config", str(config), *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited {proc.returncode} before the kill point: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.005)


def metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [row["step"] for row in read_metrics(path)] if path.exists() else []


# (arms, train changes, ready(run) -> bool, checkpoints present at the kill); ~125 ms a step leaves a margin of
# several steps between the kill point and the next checkpoint
EIGHT_STEPS = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 8}]}}
# a stage far longer than the time a signal takes to arrive under load: eight steps (~0.4 s here) ended before a
# SIGINT sent after step 1 landed once in CI, and the process exited as a finished run would
LONG_STAGE = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 4000}]}}
KILL_POINTS = {
    "before-first-checkpoint": (EIGHT_STEPS, {}, lambda run: len(metrics_steps(run)) >= 1, []),
    "after-periodic-checkpoint": (EIGHT_STEPS, {"save_every": 2},
                                  lambda run: (run / "checkpoints" / "step-00000002").is_dir(), ["step-00000002"]),
    "during-stage-2": (TWO_STAGES, {}, lambda run: 5 in metrics_steps(run), ["stage1-final"]),
}


@pytest.mark.slow  # a real `sftkey train` process: ~15-30 s of imports and data preparation
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_gives_bit_identical_weights_and_each_step_once(tmp_path, tiny_model_dir, caplog, point):
    arms, train, ready, left = KILL_POINTS[point]
    arm = next(iter(arms))
    config_file = write_config(tmp_path, tiny_model_dir, tmp_path / "killed", arms, train)
    proc = start_train(config_file)
    run = tmp_path / "killed" / arm / "seed0"
    try:
        wait_until(proc, lambda: ready(run))
    finally:
        proc.kill()
        proc.communicate()
    assert checkpoint_names(run) == left
    assert metrics_steps(run)  # the dead run logged steps
    record = json.loads((run / "run.json").read_text())
    assert (record["status"], record["pid"], record["host"]) == ("running", proc.pid, socket.gethostname())
    assert (run / "run.lock").read_text() == f"pid {proc.pid} on {socket.gethostname()}\n"  # stale, harmless

    from sftkey.train.config import load_config

    straight = train_arm(load_config(write_config(tmp_path, tiny_model_dir, tmp_path / "straight", arms, train)), arm, 0)
    caplog.set_level(logging.INFO, logger="sftkey.train")
    resumed = train_arm(load_config(config_file), arm, 0, resume=True)
    assert warnings_of(caplog)[0] == (f"{run / 'run.json'}: the previous run (pid {proc.pid} on "
                                      f"{socket.gethostname()}) died while running; marked interrupted")
    assert_same_weights(straight, resumed)
    assert steps_and_losses(run) == steps_and_losses(tmp_path / "straight" / arm / "seed0")
    assert [step for step, _ in steps_and_losses(run)] == list(range(1, 9))
    assert json.loads((run / "run.json").read_text())["status"] == "done"


@pytest.mark.slow  # a real `sftkey train` process: ~15-30 s of imports and data preparation
def test_two_resumes_on_one_run_folder_one_trains_the_other_refuses(tmp_path, tiny_model_dir):
    """Both log to one sqlite MLflow store: the second must refuse before it makes an MLflow run (CI once froze the
    first in the middle of a store write, and the second died on "database is locked" instead of refusing)."""
    from mlflow import MlflowClient

    config_file = write_config(tmp_path, tiny_model_dir, tmp_path / "runs", TWENTY_STEPS)
    run = tmp_path / "runs" / "sft_tag" / "seed0"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = start_train(config_file, "--resume", "--tracking-uri", store)
    try:
        wait_until(first, lambda: len(metrics_steps(run)) >= 1)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the lock
        frozen_at = metrics_steps(run)
        assert frozen_at[-1] < 20, f"the first run ended before it was frozen ({frozen_at}): nothing was tested"
        second = start_train(config_file, "--resume", "--tracking-uri", store)
        out, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    first_out, first_err = first.communicate(timeout=300)
    assert (second.returncode, out) == (2, ""), f"second run, exit {second.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.startswith("sftkey train:")]
    assert said == [f"sftkey train: error: {run}: another sftkey train (pid {first.pid} on {socket.gethostname()}) is "
                    "training this run folder; wait for it to finish or stop it, then rerun with --resume"]
    assert err.strip().splitlines()[-1] == said[0]
    assert first.returncode == 0, first_err[-2000:]
    assert first_out.startswith("sft_tag seed 0: ")
    assert metrics_steps(run) == list(range(1, 21))
    assert json.loads((run / "run.json").read_text())["pid"] == first.pid
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("sft_tag-seed0", "FINISHED")]  # the first's only


@pytest.mark.slow  # a real `sftkey train` process: ~15-30 s of imports and data preparation
@pytest.mark.parametrize("signum,status,code,how", [(signal.SIGTERM, "killed", 143, "killed by SIGTERM"),
                                                    (signal.SIGINT, "interrupted", 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_marks_the_run_and_exits_with_one_line(tmp_path, tiny_model_dir, signum, status, code, how):
    config_file = write_config(tmp_path, tiny_model_dir, tmp_path / "runs", LONG_STAGE)
    run = tmp_path / "runs" / "sft_tag" / "seed0"
    proc = start_train(config_file)
    try:
        wait_until(proc, lambda: len(metrics_steps(run)) >= 1)
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code and "Traceback" not in err, err[-3000:]
    assert len(metrics_steps(run)) < 4000  # stopped mid-stage
    assert err.strip().splitlines()[-1] == (f"sftkey train: sft_tag seed 0: {how}; rerun with --resume to continue "
                                            "from its newest checkpoint")
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == status and record["pid"] == proc.pid
