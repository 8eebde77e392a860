"""Crash hygiene: runs left RUNNING/STARTED by a dead pipeline process are reaped (and a live one's are not), a
signal ends the pipeline's runs as killed, a failed step is reported as its root cause in one line, credentials
never reach MLflow, and `sftkey ui`'s servers die with it. Real sqlite MLflow stores, real Dagster instances,
real processes; the end-to-end kills of `sftkey pipeline` are marked slow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from orchestration.pipeline import (
    HOST_TAG,
    PID_TAG,
    REAPED_TAG,
    PipelineInterrupt,
    SignalWatch,
    _failure,
    log_pipeline_config,
    reap_dagster_runs,
)
from orchestration.tracking import MlflowResource, MlflowTracker
from sftkey.errors import UserError
from tests.orchestration.conftest import PROJECT, smoke_raw, write_config

HOST = socket.gethostname()


def dead_pid() -> int:
    """The pid of a process that has exited (and been waited for)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def tracking(mlflow_db) -> MlflowResource:
    return MlflowResource(tracking_uri=f"sqlite:///{mlflow_db}", experiment="crash")


# ---------------------------------------------------------------------------------- reaping

def test_reaping_marks_only_the_runs_of_dead_processes_on_this_host(tracking):
    client, experiment = tracking.client(), tracking.experiment_id()
    owners = {"dead": (str(dead_pid()), HOST), "alive": (str(os.getpid()), HOST),
              "other host": (str(dead_pid()), HOST + "-elsewhere"), "untagged": None}
    ids = {}
    for name, owner in owners.items():
        tags = {"sftkey.pid": owner[0], "sftkey.host": owner[1]} if owner else {}
        ids[name] = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    assert tracking.reap_dead_runs("pipeline run p2") == [ids["dead"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "other host": "RUNNING", "untagged": "RUNNING"}
    assert client.get_run(ids["dead"]).data.tags["sftkey.reaped"] == (
        f"process {owners['dead'][0]} on {HOST} was gone; marked KILLED by pipeline run p2")
    assert tracking.reap_dead_runs("again") == []  # nothing RUNNING of a dead process is left


def test_dagster_runs_of_dead_processes_are_marked_failed(tmp_path):
    from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

    (tmp_path / "dagster").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster"))
    pid = str(dead_pid())
    runs = {"dead started": (DagsterRunStatus.STARTED, pid, HOST),
            "dead starting": (DagsterRunStatus.STARTING, pid, HOST),
            "alive": (DagsterRunStatus.STARTED, str(os.getpid()), HOST),
            "other host": (DagsterRunStatus.STARTED, pid, HOST + "-elsewhere"),
            "finished": (DagsterRunStatus.SUCCESS, pid, HOST)}
    ids = {}
    for name, (status, owner, host) in runs.items():
        run = instance.add_run(DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=status,
                                          tags={PID_TAG: owner, HOST_TAG: host}))
        ids[name] = run.run_id
    pool = instance.event_log_storage
    pool.set_concurrency_slots("sftkey_cpu", 2)
    for name in ("dead started", "alive"):  # each holds a slot of the device pool for its training step
        assert pool.claim_concurrency_slot("sftkey_cpu", ids[name], "train").is_claimed
    assert sorted(reap_dagster_runs(instance, "p2")) == sorted([ids["dead started"], ids["dead starting"]])
    # the dead run's slot is free again (else the next run's cells would wait for it forever); the live run keeps its
    assert pool.get_concurrency_info("sftkey_cpu").active_run_ids == {ids["alive"]}
    status = {name: instance.get_run_by_id(run_id).status.value for name, run_id in ids.items()}
    assert status == {"dead started": "FAILURE", "dead starting": "FAILURE", "alive": "STARTED",
                      "other host": "STARTED", "finished": "SUCCESS"}
    assert instance.get_run_by_id(ids["dead started"]).tags[REAPED_TAG] == (
        f"process {pid} on {HOST} was gone; marked failed by p2")


# ---------------------------------------------------------------------------------- signals

def test_a_signal_raises_in_the_main_thread_and_is_recorded():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(PipelineInterrupt) as interrupt:
        with SignalWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises before this ends
    assert interrupt.value.signum == signal.SIGTERM and watch.received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_a_signal_caught_by_someone_else_is_still_seen():
    # Dagster installs its own handler while a step runs; the wakeup fd still records the signal.
    with SignalWatch() as watch:
        previous = signal.signal(signal.SIGINT, lambda *_: None)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        signal.signal(signal.SIGINT, previous)
        with pytest.raises(PipelineInterrupt) as interrupt:
            watch.check()
    assert interrupt.value.signum == signal.SIGINT


# ---------------------------------------------------------------------------------- failures and credentials

class BadRecords(UserError):
    pass


@dg.asset
def wrapped() -> int:
    try:
        {}["missing"]
    except KeyError as error:
        raise RuntimeError("reading the manifest failed") from error


@dg.asset
def refused() -> int:
    raise BadRecords("train.jsonl line 3: no '####' answer marker; fix the line or drop it")


def test_a_failed_step_is_reported_as_its_root_cause():
    outcome = dg.materialize([wrapped], raise_on_error=False)
    assert _failure(outcome) == (f"step wrapped: KeyError: 'missing' (trace: Dagster run {outcome.run_id}, in "
                                 "`sftkey ui` or with --verbose)")


def test_a_user_error_in_an_asset_arrives_as_its_own_message():
    outcome = dg.materialize([refused], raise_on_error=False)
    assert _failure(outcome) == ("step refused: train.jsonl line 3: no '####' answer marker; fix the line or drop it "
                                 f"(trace: Dagster run {outcome.run_id}, in `sftkey ui` or with --verbose)")


def test_the_logged_config_holds_no_credentials(tiny_model_dir, tmp_path, tracking):
    from orchestration.config import load_pipeline_config

    secret_uri = "http://alice:hunter2@mlflow.example:5000/?token=t0ken"
    raw = smoke_raw(tiny_model_dir, tmp_path / "work", tracking={"tracking_uri": secret_uri})
    config = load_pipeline_config(write_config(raw, tmp_path / "pipeline.yaml"))
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id()).info.run_id
    log_pipeline_config(MlflowTracker(client, run_id), config)
    params = client.get_run(run_id).data.params
    assert params["pipeline.tracking.tracking_uri"] == "http://alice:***@mlflow.example:5000/?token=***"
    assert not [k for k, v in params.items() if "hunter2" in v or "t0ken" in v]
    logged = Path(client.download_artifacts(run_id, "pipeline.yaml", str(tmp_path / "down")))
    assert yaml.safe_load(logged.read_text())["tracking"]["tracking_uri"] == "http://alice:***@mlflow.example:5000/?token=***"


# ---------------------------------------------------------------------------------- `sftkey pipeline`, killed

RUN_LINE = "] one Dagster run of sftkey_pipeline: "  # what `sftkey pipeline` prints as its run starts


def start_pipeline(config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sftkey.cli", "pipeline", "--config", str(config)], env=env,
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def signal_during(process: subprocess.Popen, stage: str, after_s: float, signum: int) -> list[str]:
    """Send `signum` `after_s` seconds after the pipeline printed the line of `stage`; its stdout lines."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if stage in line:
            time.sleep(after_s)
            process.send_signal(signum)
            break
    else:
        raise AssertionError(f"the pipeline ended before {stage!r}: {lines}")
    lines += process.stdout.readlines()
    process.wait(120)
    return lines


def signal_when_running(process: subprocess.Popen, config_path: Path, run_prefix: str, signum: int,
                        timeout_s: float = 300) -> list[str]:
    """Send `signum` once this process's pipeline run has an MLflow asset run `run_prefix...` RUNNING (runs left
    RUNNING by an earlier killed pipeline do not count), wait for the exit; its stdout lines."""
    lines = []
    for line in process.stdout:  # past start-up: this run has its parent run and has reaped the earlier ones
        lines.append(line)
        if RUN_LINE in line:
            break
    wait_for_asset_run(process, config_path, lambda r: r.info.run_name.startswith(run_prefix)
                       and r.info.status == "RUNNING", f"{run_prefix} run RUNNING", timeout_s)
    process.send_signal(signum)
    out, _ = process.communicate(timeout=120)
    return lines + out.splitlines(keepends=True)


def wait_for_asset_run(process: subprocess.Popen, config_path: Path, wanted, what: str, timeout_s: float = 600) -> None:
    """Return once this process's pipeline run has an MLflow asset run for which `wanted(run)` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            _, children = latest_pipeline_run(config_path)
        except Exception:  # the store may be busy
            children = []
        if any(wanted(r) for r in children):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {what} of this pipeline before it ended or {timeout_s} s passed")


def leftovers(config_path: Path) -> tuple[list[str], list[str]]:
    """Names of the MLflow runs still RUNNING and ids of the Dagster runs still unfinished, read from the stores."""
    from orchestration.config import load_pipeline_config, resources

    config = load_pipeline_config(config_path)
    tracking = resources(config)["tracking"]
    running = tracking.client().search_runs([tracking.experiment_id()], "attributes.status = 'RUNNING'")
    instance = dg.DagsterInstance.from_config(str(config.work_dir / "dagster"))
    unfinished = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING,
                                                           dg.DagsterRunStatus.NOT_STARTED]))
    return sorted(r.info.run_name for r in running), [r.run_id for r in unfinished]


def registry_versions(config_path: Path) -> list:
    from orchestration.config import load_pipeline_config, resources

    config = load_pipeline_config(config_path)
    client = resources(config)["tracking"].client()
    versions = client.search_model_versions(f"name = '{config.sections.promotion.model_name}'")
    return sorted(versions, key=lambda v: int(v.version))


def kill_once_undecided(process: subprocess.Popen, config_path: Path, timeout_s: float = 300) -> bool:
    """Let a SIGSTOPped pipeline run in 20 ms slices until its registry holds a version without a decision, then
    kill -9 it there; False when the decision came first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            versions = registry_versions(config_path)
        except Exception:  # the stopped process may hold the sqlite write lock: let it run a slice and retry
            versions = []
        if versions and "promotion.decision" not in versions[-1].tags:
            process.kill()
            process.wait(60)
            return True
        if versions and "promotion.decision" in versions[-1].tags:
            break
        process.send_signal(signal.SIGCONT)
        time.sleep(0.02)
        process.send_signal(signal.SIGSTOP)
    process.kill()
    process.wait(60)
    return False


def latest_pipeline_run(config_path: Path) -> tuple:
    """The newest pipeline parent run and its asset runs (found by MLflow's parent tag, not by start times)."""
    from orchestration.config import load_pipeline_config, resources
    from orchestration.tracking import PARENT_TAG

    tracking = resources(load_pipeline_config(config_path))["tracking"]
    runs = tracking.client().search_runs([tracking.experiment_id()], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.info.run_name.startswith("smoke-"))
    return parent, [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]


@pytest.mark.slow
def test_killed_pipelines_leave_nothing_running_after_the_next_run(tiny_model_dir, shared_data, tmp_path):
    config = write_config(smoke_raw(tiny_model_dir, tmp_path / "work"), tmp_path / "pipeline.yaml")

    # kill -9 during data: today's state, the runs stay RUNNING/STARTED
    first = start_pipeline(config, tmp_path / "first.err")
    signal_during(first, RUN_LINE, 5, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    running, unfinished = leftovers(config)
    assert [n for n in running if n.startswith("smoke-")] and len(unfinished) == 1

    # kill -9 during training: this run reaps the first one's runs when it starts
    second = start_pipeline(config, tmp_path / "second.err")
    lines = signal_when_running(second, config, "stage1_model", signal.SIGKILL)
    assert any(line.startswith("marked ") and "MLflow run(s) KILLED and 1 Dagster run(s) failed" in line
               for line in lines), lines
    running, unfinished = leftovers(config)
    assert "stage1_model[sft_tag|0]" in running and len(unfinished) == 1

    # SIGTERM during training: its own runs end KILLED / failed at once, exit 143 with one line
    third = start_pipeline(config, tmp_path / "third.err")
    signal_when_running(third, config, "stage1_model", signal.SIGTERM)
    err = (tmp_path / "third.err").read_text()
    assert third.returncode == 128 + signal.SIGTERM, err
    assert not [line for line in err.splitlines() if "Stack Trace" in line or " - dagster - " in line], err
    assert err.splitlines()[-1].startswith("sftkey pipeline: error: interrupted by SIGTERM during the sftkey_pipeline "
                                           "run; MLflow run ")
    assert leftovers(config) == ([], [])
    parent, children = latest_pipeline_run(config)  # the third run: its parent and its interrupted training run
    assert parent.info.status == "KILLED"
    # Dagster may let the running step finish before it acts on the signal: each child ended, none left RUNNING
    assert children and {r.info.status for r in children} <= {"FINISHED", "KILLED"}

    # kill -9 between registration and the gate's decision: an undecided version is left behind
    fourth = start_pipeline(config, tmp_path / "fourth.err")
    threading.Thread(target=fourth.stdout.read, daemon=True).start()  # a full pipe would stall the pipeline
    wait_for_asset_run(fourth, config, lambda r: r.info.run_name == "arm_comparison", "arm_comparison run")
    fourth.send_signal(signal.SIGSTOP)
    assert kill_once_undecided(fourth, config), "the gate decided before the version could be seen undecided"

    # and a full run afterwards resumes, decides the orphan, finishes and leaves nothing running either
    fifth = start_pipeline(config, tmp_path / "fifth.err")
    out, _ = fifth.communicate(timeout=900)
    assert fifth.returncode == 0, (tmp_path / "fifth.err").read_text()[-3000:]
    assert "finished in" in out
    assert leftovers(config) == ([], [])
    versions = registry_versions(config)  # one version (same weights, same benchmark), decided, and champion
    assert [(str(v.version), v.tags["promotion.decision"]) for v in versions] == [("1", "promoted")]
