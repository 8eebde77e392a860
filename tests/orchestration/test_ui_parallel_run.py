"""`sftkey pipeline` on a 2-seed config, watched live: the Dagster UI shows ONE run of `sftkey_pipeline` with both
seeds' stage 1 in progress at once (screenshot and DOM of the run page, step states from the UI's GraphQL API), and
MLflow already holds loss steps of both running stage runs while they train.

Slow (a real pipeline subprocess, both UI servers and a browser; about 3-4 minutes on 2 cores). Screenshots go to the
test's tmp folder, and also to $SFTKEY_SCREENSHOTS when set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.orchestration.conftest import PROJECT, seed_mlflow_store, smoke_raw, write_config
from tests.orchestration.test_ui import CHROMIUM, chromium, free_port

SEEDS = (0, 1)
STEPS = 120  # stage 1 trains for about a minute with both cells sharing 2 cores: time to look at it while it runs
STAGE1 = {seed: f"sft_tag__seed{seed}__stage1_model" for seed in SEEDS}  # Dagster step keys of the two cells
WAIT_S = 240.0


def two_seed_raw(tiny_model_dir: Path, work: Path) -> dict:
    """One arm (it is the baseline and the candidate) x seeds 0 and 1, two cells at once, a short benchmark without
    lm-eval. The seeds' stage keys differ, so neither cell waits on the other's checkpoint lock."""
    raw = smoke_raw(tiny_model_dir, work, compute={"device": "cpu", "concurrency": 2},
                    benchmark={"dataset": "svamp", "split": "test", "limit": 8, "max_new_tokens": 16, "batch_size": 8})
    raw["training"]["seeds"] = list(SEEDS)
    raw["training"]["arms"] = {"sft_tag": {"format": "tagged",
                                           "stages": [{"name": "stage1", "loss": "sft", "steps": STEPS}]}}
    return raw


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.load(reply)
    assert "errors" not in answer, answer
    return answer["data"]


def ui_runs(port: int) -> list[tuple[str, str, str]]:
    """(run id, job, status) of every run the Dagster UI lists."""
    data = graphql(port, "{ runsOrError { __typename ... on Runs { results { runId jobName status } } } }")
    return [(r["runId"], r["jobName"], r["status"]) for r in data["runsOrError"]["results"]]


def ui_step_stats(port: int, run_id: str) -> dict[str, dict]:
    """The run's steps as the UI shows them: {step key: {status, startTime, endTime}}."""
    data = graphql(port, '{ runOrError(runId: "%s") { __typename ... on Run { stepStats { stepKey status startTime '
                         'endTime } } } }' % run_id)
    return {s["stepKey"]: s for s in data["runOrError"]["stepStats"]}


def stage1_events(instance, run_id: str) -> tuple[set[str], set[str]]:
    """(started, succeeded) stage 1 step keys, from the run's event log."""
    import dagster as dg

    started, succeeded = set(), set()
    for record in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START,
                                                     dg.DagsterEventType.STEP_SUCCESS}):
        event = record.dagster_event
        if event.step_key in STAGE1.values():
            (started if event.event_type == dg.DagsterEventType.STEP_START else succeeded).add(event.step_key)
    return started, succeeded


def wait_for(what: str, probe, pipeline: subprocess.Popen, log: Path, timeout_s: float = WAIT_S):
    """probe()'s first truthy value, polled while the pipeline runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if pipeline.poll() is not None:
            pytest.fail(f"the pipeline exited ({pipeline.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def both_training(instance, pipeline, log) -> str:
    """The pipeline's Dagster run id, once both stage 1 steps have started and neither has finished."""
    import dagster as dg

    def probe():
        runs = instance.get_runs(dg.RunsFilter(job_name="sftkey_pipeline"))
        if len(runs) != 1:
            return None
        started, succeeded = stage1_events(instance, runs[0].run_id)
        assert not succeeded, f"{sorted(succeeded)} finished before both stage 1 steps were seen running"
        return runs[0].run_id if started == set(STAGE1.values()) else None

    return wait_for("both stage 1 steps running", probe, pipeline, log)


def streamed_losses(client, experiment_id: str, pipeline, log) -> dict[str, int]:
    """{cell: loss steps logged} of both stage 1 MLflow runs, once each is RUNNING with at least one loss step."""
    def probe():
        runs = client.search_runs([experiment_id], "tags.`dagster.asset` = 'stage1_model'")
        steps = {run.data.tags["sftkey.cell"]: len(client.get_metric_history(run.info.run_id, "loss"))
                 for run in runs if run.info.status == "RUNNING"}
        return steps if len(steps) == 2 and min(steps.values()) >= 1 else None

    return wait_for("loss steps of both running stage 1 runs in MLflow", probe, pipeline, log)


def keep_screenshots(shots: Path) -> None:
    if os.environ.get("SFTKEY_SCREENSHOTS"):
        keep = Path(os.environ["SFTKEY_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy(shot, keep)


@pytest.mark.slow
def test_one_dagster_run_trains_both_seeds_at_once_and_streams_metrics(tiny_model_dir, tmp_path, mlflow_template,
                                                                      shared_data, monkeypatch):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    import dagster as dg
    from mlflow import MlflowClient

    from orchestration import ui
    from orchestration.config import load_pipeline_config

    work = tmp_path / "work"
    config_path = write_config(two_seed_raw(tiny_model_dir, work), tmp_path / "pipeline_two_seeds.yaml")
    database = seed_mlflow_store(mlflow_template, work / "mlflow" / "mlflow.db")
    monkeypatch.setenv("DAGSTER_HOME", str(work / "dagster"))  # the UI, the pipeline and this test: one instance
    config = load_pipeline_config(config_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    log = tmp_path / "pipeline.log"
    dagster_port, mlflow_port = free_port(), free_port()

    with open(log, "w") as out, open(tmp_path / "pipeline.err", "w") as err:
        pipeline = subprocess.Popen([str(Path(sys.executable).parent / "sftkey"), "pipeline", "--config",
                                     str(config_path)], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                    stderr=err, cwd=PROJECT)
    services = []
    try:
        services = ui.start(config, dagster_port=dagster_port, mlflow_port=mlflow_port, log_dir=tmp_path / "ui-logs")
        instance = dg.DagsterInstance.get()
        run_id = both_training(instance, pipeline, log)

        # The same moment, as the UI's API reports it: one run, both cells' stage 1 in progress.
        assert ui_runs(dagster_port) == [(run_id, "sftkey_pipeline", "STARTED")]
        steps = ui_step_stats(dagster_port, run_id)
        assert {steps[key]["status"] for key in STAGE1.values()} == {"IN_PROGRESS"}, steps

        client = MlflowClient(f"sqlite:///{database}")
        experiment_id = client.get_experiment_by_name(config.sections.tracking.experiment).experiment_id
        losses = streamed_losses(client, experiment_id, pipeline, log)
        assert sorted(losses) == ["sft_tag|0", "sft_tag|1"]
        assert max(losses.values()) < STEPS  # logged during training, not afterwards

        run_url = f"http://127.0.0.1:{dagster_port}/runs/{run_id}"
        # one browser load gives both, so the DOM is what the screenshot shows
        dom = chromium(run_url, tmp_path / "profile-dagster", "--dump-dom",
                       f"--screenshot={shots / 'dagster_parallel_run.png'}")
        (shots / "dagster_parallel_run.html").write_text(dom)
        assert run_id[:8] in dom and "sftkey_pipeline" in dom  # the run's page, rendered
        text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
        assert re.search(r"Executing \( ?2 ?\)", text), "the run page does not show both stage 1 steps executing"
        for key in STAGE1.values():
            assert key in dom, f"{key} not on the run page"

        pipeline.wait(timeout=WAIT_S)
        printed = log.read_text()
        assert pipeline.returncode in (0, 1), printed[-3000:]  # 1: the promotion gate said no; no crash either way
        assert "Comparison" in printed

        assert ui_runs(dagster_port) == [(run_id, "sftkey_pipeline", "SUCCESS" if pipeline.returncode == 0
                                          else "FAILURE")]
        final = ui_step_stats(dagster_port, run_id)
        (a, b) = (final[STAGE1[seed]] for seed in SEEDS)
        assert a["status"] == b["status"] == "SUCCESS"
        assert max(a["startTime"], b["startTime"]) < min(a["endTime"], b["endTime"])  # the two intervals overlap
    finally:
        ui.stop(services)
        if pipeline.poll() is None:
            pipeline.terminate()  # SIGTERM: the pipeline marks its runs killed and exits
            try:
                pipeline.wait(60)
            except subprocess.TimeoutExpired:
                pipeline.kill()
                pipeline.wait()
        keep_screenshots(shots)  # a failed run's page too: it shows what went wrong

    png = (shots / "dagster_parallel_run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a rendered page, not a blank one
