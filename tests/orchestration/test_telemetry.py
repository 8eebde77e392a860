"""Live telemetry against a real sqlite MLflow store and real Dagster: each step's metrics in MLflow as it ends (own
timestamp), progress lines in the Dagster run log and on the console, from a stage in process, from one launched
through Dagster Pipes, and from `sftkey train --tracking-uri`."""

import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from orchestration.telemetry import (
    STAGE_STATUS_TAG,
    TRAINED_IN_TAG,
    StepTracker,
    format_duration,
    log_missing_steps,
    progress_console,
    progress_line,
    reuse_tags,
    stage_telemetry,
    tracker_from_env,
)
from orchestration.tracking import MlflowResource, MlflowTracker
from sftkey.train.tracking import FanoutTracker, NullTracker, read_metrics

PROJECT = Path(__file__).resolve().parents[2]
ARITH = PROJECT / "tests" / "train" / "fixtures" / "arith.jsonl"  # 24 small GSM8K-style records
SMOKE = PROJECT / "configs" / "smoke_cpu.yaml"
STEPS = 8
PAUSE_S = 0.05  # each step of the test stages lasts at least this long (a slow logger), so times are far apart
LINE = re.compile(r"^sft_tag seed 0 stage1: step (\d+)/8 loss \d+\.\d{4} tok/s \d+ ETA (\d+s|\d+m\d\ds)$")
# `python -m orchestration.launch_stage ARGS` whose optimizer steps last PAUSE_S longer (a slower model)
SLOW_LAUNCH = ("import sys, time; from sftkey.train import trainer; step = trainer.StageRecipe._optimizer_step; "
               f"trainer.StageRecipe._optimizer_step = lambda self, i: (time.sleep({PAUSE_S}), step(self, i))[1]; "
               "from orchestration.launch_stage import main; sys.exit(main(sys.argv[1:]))")
STEP_METRICS = {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "epoch"}


class SlowLogger(NullTracker):
    """A tracker that takes PAUSE_S per step (a slow network): steps are then far apart in time."""

    def log_metrics(self, metrics, step):
        time.sleep(PAUSE_S)


@pytest.fixture
def tracking(mlflow_db) -> MlflowResource:  # tmp_path/mlflow/mlflow.db, a migrated copy (conftest)
    return MlflowResource(tracking_uri=f"sqlite:///{mlflow_db}", experiment="test")


@pytest.fixture
def training(tiny_model_dir, tmp_path):
    from sftkey.train.config import config_from_dict

    return config_from_dict({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"), "seeds": [0],
        "data": {"dataset": "gsm8k", "path": str(ARITH), "max_length": 256},
        "train": {"batch_size": 4, "lr": 1.0e-3, "warmup_epochs": 0.5, "pack_length": 512, "log_every": 1},
        "arms": {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": STEPS}]}},
    })


def new_run(tracking: MlflowResource) -> MlflowTracker:
    client = tracking.client()
    return MlflowTracker(client, client.create_run(tracking.experiment_id()).info.run_id)


def loss_history(run: MlflowTracker) -> list[tuple[int, int]]:
    """(step, timestamp ms) of the run's loss, by step."""
    return sorted((m.step, m.timestamp) for m in run.client.get_metric_history(run.run_id, "loss"))


def assert_live(history: list[tuple[int, int]], ended_ms: int) -> None:
    """One distinct timestamp per step, in step order, PAUSE_S or more apart; the first well before the end."""
    assert [step for step, _ in history] == list(range(1, STEPS + 1))
    stamps = [stamp for _, stamp in history]
    assert all(later - earlier >= PAUSE_S * 1000 * 0.9 for earlier, later in zip(stamps, stamps[1:]))
    assert stamps[0] <= ended_ms - (STEPS - 1) * PAUSE_S * 1000 * 0.9


# --------------------------------------------------------------------------- progress lines


def test_progress_line_and_durations():
    assert [format_duration(s) for s in (0, 0.4, 45, 59.6, 65, 3599, 3600, 7390, math.inf)] == [
        "0s", "0s", "45s", "1m00s", "1m05s", "59m59s", "1h00m", "2h03m", "?"]
    assert progress_line("sft_tag seed 0 stage1", 12, 40, 1.23456, 350.4, 65) == (
        "sft_tag seed 0 stage1: step 12/40 loss 1.2346 tok/s 350 ETA 1m05s")


# --------------------------------------------------------------------------- in process


def test_in_process_stage_logs_each_step_to_mlflow_as_it_ends(tracking, training):
    from sftkey.train.trainer import run_stage

    run = new_run(tracking)
    lines = []
    tracker = StepTracker(run.client, run.run_id, say=lines.append, label="sft_tag seed 0 stage1", every_s=0)
    run_stage(training, "sft_tag", 0, 0, training.model, tracker=FanoutTracker(tracker, SlowLogger()))
    ended_ms = int(time.time() * 1000)

    assert tracker.live  # nothing MLflow refused (the trainer's params agree with the run's)
    assert_live(loss_history(run), ended_ms)
    logged = run.client.get_run(run.run_id).data
    assert STEP_METRICS | {"loss_answer"} <= set(logged.metrics)  # lr, grad norm, tok/s and a loss per role
    assert logged.params["stage1.steps"] == str(STEPS)  # the trainer's params and tags pass through
    assert (logged.tags["arm"], logged.tags["seed"], logged.tags["stage"]) == ("sft_tag", "0", "stage1")
    # every_s=0: one progress line per step, in order, the last with nothing left to wait for
    assert [int(LINE.match(line)[1]) for line in lines] == list(range(1, STEPS + 1))
    assert lines[-1].endswith(" ETA 0s")
    # what MLflow shows is what metrics.jsonl holds, stamped within the same moment
    rows = read_metrics(Path(training.output_dir) / "sft_tag" / "seed0" / "metrics.jsonl")
    assert [(row["step"], row["loss"]) for row in rows] == sorted(
        (m.step, m.value) for m in run.client.get_metric_history(run.run_id, "loss"))
    assert all(abs(row["time"] * 1000 - stamp) < 1000 for row, (_, stamp) in zip(rows, loss_history(run)))


def test_progress_lines_are_throttled_to_first_last_and_every_s(tracking):
    run = new_run(tracking)
    lines = []
    tracker = StepTracker(run.client, run.run_id, say=lines.append, label="x", every_s=3600)
    tracker.start_stage("stage2", steps=5, offset=10, start=1)  # resumed after its step 1, global steps 12..15
    for step in range(12, 16):
        tracker.log_metrics({"loss": 1.0, "tokens_per_s": 2.0}, step)
    assert [line.split(" loss")[0] for line in lines] == ["x: step 2/5", "x: step 5/5"]
    assert [s for s, _ in loss_history(run)] == [12, 13, 14, 15]  # MLflow gets every step


def test_label_defaults_to_the_trainers_tags(tracking):
    run = new_run(tracking)
    lines = []
    tracker = StepTracker(run.client, run.run_id, say=lines.append)
    tracker.set_tags({"arm": "sft_tag", "seed": "1"})
    tracker.start_stage("stage1", steps=1, offset=0, start=0)
    tracker.log_metrics({"loss": 0.5, "tokens_per_s": 10.0}, 1)
    assert lines == ["sft_tag seed 1 stage1: step 1/1 loss 0.5000 tok/s 10 ETA 0s"]


def test_an_mlflow_failure_warns_once_and_training_goes_on(tracking, training):
    from sftkey.train.trainer import run_stage

    run = new_run(tracking)
    warnings = []
    tracker = StepTracker(run.client, "no-such-run", warn=warnings.append)  # every log_batch is refused
    run_stage(training, "sft_tag", 0, 0, training.model, tracker=FanoutTracker(tracker, SlowLogger()))
    # the trainer's first call (its tags) is refused; nothing is sent after it
    assert len(warnings) == 1 and warnings[0].startswith("MLflow run no-such-run: logging tags failed (")
    assert not tracker.live
    # the steps then reach MLflow from metrics.jsonl, at the times the trainer recorded
    rows = read_metrics(Path(training.output_dir) / "sft_tag" / "seed0" / "metrics.jsonl")
    assert log_missing_steps(run, rows) == STEPS
    assert loss_history(run) == [(row["step"], int(row["time"] * 1000)) for row in rows]
    assert_live(loss_history(run), int(time.time() * 1000))
    assert log_missing_steps(run, rows) == 0  # nothing twice


def test_reused_stage_is_logged_at_its_training_times_and_names_the_run_that_trained_it(tracking):
    trained, reused = new_run(tracking), new_run(tracking)
    trained.set_tags({"sftkey.stage_key": "k1"} | reuse_tags(trained, "trained", "k1"))
    rows = [{"type": "metrics", "step": s, "time": 1767225600.0 + s, "stage": "stage1", "loss": 3.0 - s, "lr": 0.1}
            for s in (1, 2, 3)] + [{"type": "metrics", "step": 4, "stage": "stage1", "loss": 0.5}]  # no time: now
    before = int(time.time() * 1000)
    assert log_missing_steps(reused, rows) == 4
    history = loss_history(reused)
    assert history[:3] == [(1, 1767225601000), (2, 1767225602000), (3, 1767225603000)]
    assert history[3][0] == 4 and history[3][1] >= before
    assert reused.client.get_run(reused.run_id).data.metrics == {"loss": 0.5, "lr": 0.1}  # no time/step/stage metric
    assert reuse_tags(reused, "reused", "k1") == {STAGE_STATUS_TAG: "reused", TRAINED_IN_TAG: trained.run_id}
    assert reuse_tags(reused, "reused", "other") == {STAGE_STATUS_TAG: "reused"}  # not in this store: no guess


# --------------------------------------------------------------------------- Dagster: run log, Pipes, console


def stage_asset(training, prepared: Path, tracking_resource: MlflowResource, launched: bool):
    """An asset training stage 1 of sft_tag seed 0 in process, or under `python -m orchestration.launch_stage`
    through Dagster Pipes, with the telemetry of its MLflow run."""
    from sftkey.config_file import dump_yaml
    from sftkey.train.config import config_dict

    @dg.asset
    def stage(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.Output[dict]:
        with mlflow.asset_run(context) as run:
            telemetry = stage_telemetry(context, run, "sft_tag seed 0 stage1", every_s=0)
            if not launched:
                from sftkey.prepare import read_prepared
                from sftkey.train.trainer import run_stage

                run_stage(training, "sft_tag", 0, 0, training.model, tracker=FanoutTracker(telemetry.tracker,
                                                                                          SlowLogger()),
                          prepared=read_prepared(prepared))
            else:
                config = Path(training.output_dir) / "stage.yaml"
                config.parent.mkdir(parents=True, exist_ok=True)
                config.write_text(dump_yaml(config_dict(training)))
                command = [sys.executable, "-c", SLOW_LAUNCH, "--config", str(config), "--arm",
                           "sft_tag", "--seed", "0", "--stage-index", "0", "--init", training.model,
                           "--prepared", str(prepared)]
                result = dg.PipesSubprocessClient().run(context=context, command=command, cwd=str(PROJECT),
                                                        env=telemetry.env | {"OMP_NUM_THREADS": "1"})
                assert [m["checkpoint"] for m in result.get_custom_messages()][0].endswith("stage1-final")
            return dg.Output({"run_id": run.run_id})  # a plain value after a Pipes session is refused

    return stage


@pytest.fixture
def prepared(tiny_model_dir, tmp_path) -> Path:
    from sftkey.cli import main

    out = tmp_path / "prepared"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data-path", str(ARITH), "--max-length", "256",
                 "--out", str(out)]) == 0
    return out


def materialize_stage(training, prepared, tracking, launched, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([stage_asset(training, prepared, tracking, launched)], instance=instance,
                            resources={"mlflow": tracking})
    ended_ms = int(time.time() * 1000)
    run_id = result.output_for_node("stage")["run_id"]
    messages = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.is_dagster_event is False]
    assert not [m for m in messages if m.startswith("MLflow run ")]  # no MLflow refusal warned about
    return MlflowTracker(tracking.client(), run_id), messages, ended_ms


def test_in_process_progress_reaches_the_dagster_run_log(tracking, training, prepared, tmp_path):
    run, messages, ended_ms = materialize_stage(training, prepared, tracking, False, tmp_path)
    assert_live(loss_history(run), ended_ms)
    progress = [m for m in messages if LINE.match(m)]
    assert [int(LINE.match(m)[1]) for m in progress] == list(range(1, STEPS + 1))


@pytest.mark.slow  # a subprocess importing torch, transformers and mlflow: 10 s of CPU before it trains
@pytest.mark.timeout(300)
def test_a_stage_launched_through_pipes_streams_metrics_and_progress(tracking, training, prepared, tmp_path):
    run, messages, ended_ms = materialize_stage(training, prepared, tracking, True, tmp_path)
    assert_live(loss_history(run), ended_ms)
    logged = run.client.get_run(run.run_id).data
    assert STEP_METRICS | {"loss_answer"} <= set(logged.metrics)
    assert "stage 0 of sft_tag seed 0 on 1 processes" in messages
    assert [int(LINE.match(m)[1]) for m in messages if LINE.match(m)] == list(range(1, STEPS + 1))


def test_tracker_from_env_needs_both_variables(tracking):
    run = new_run(tracking)
    uri = run.client.tracking_uri
    assert tracker_from_env(print, env={"MLFLOW_TRACKING_URI": uri}) is None
    assert tracker_from_env(print, env={"MLFLOW_RUN_ID": run.run_id}) is None
    built = tracker_from_env(print, env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run.run_id,
                                         "SFTKEY_PROGRESS_LABEL": "a seed 1 s", "SFTKEY_PROGRESS_EVERY_S": "2.5"})
    assert (built.run_id, built.label, built.every_s) == (run.run_id, "a seed 1 s", 2.5)


def console_job():
    @dg.asset
    def chatty(context: dg.AssetExecutionContext) -> int:
        context.log.debug("debug detail")
        context.log.info("an info line")
        context.log.info(progress_line("sft_tag seed 0 stage1", 3, 8, 1.5, 120.0, 30))
        context.log.warning("disk almost full")
        return 1

    @dg.asset(deps=[chatty])
    def broken() -> None:
        raise ValueError("boom")

    defs = dg.Definitions(assets=[chatty, broken], loggers={"progress_console": progress_console})
    return defs.resolve_implicit_global_asset_job_def()


def test_console_logger_prints_progress_lines_and_warnings(capsys):
    job = console_job()
    result = job.execute_in_process(run_config={"loggers": {"progress_console": {"config": {"log_level": "WARNING"}}}},
                                    raise_on_error=False)
    assert not result.success
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sft_tag seed 0 stage1: step 3/8 loss 1.5000 tok/s 120 ETA 30s"
    assert out[1] == "WARNING chatty: disk almost full"
    assert any(line.startswith("ERROR broken: ") and "ValueError: boom" in line for line in out[2:])
    assert not [line for line in out if "info line" in line or "debug detail" in line or "STEP_SUCCESS" in line]

    job.execute_in_process(run_config={"loggers": {"progress_console": {"config": {"log_level": "CRITICAL",
                                                                                  "progress": False}}}},
                           raise_on_error=False)
    assert capsys.readouterr().out == ""
    job.execute_in_process(run_config={"loggers": {"progress_console": {"config": {"log_level": "INFO"}}}},
                           raise_on_error=False)
    assert "INFO chatty: an info line" in capsys.readouterr().out.splitlines()
    with pytest.raises(dg.DagsterInvalidConfigError):
        job.execute_in_process(run_config={"loggers": {"progress_console": {"config": {"log_level": "LOUD"}}}})


# --------------------------------------------------------------------------- sftkey train --tracking-uri


def train_args(tiny_model_dir, tmp_path) -> list[str]:
    return ["train", "--config", str(SMOKE), "--set", f"model={tiny_model_dir}", "--set",
            f"output_dir={tmp_path / 'runs'}", "--set", f"data.path={ARITH}"]


def test_sftkey_train_logs_one_mlflow_run_per_arm_and_seed(tiny_model_dir, mlflow_db, tmp_path, capsys,
                                                          monkeypatch):
    from sftkey.cli import main
    from sftkey.train.cli import FINAL_CHECKPOINT_TAG

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{mlflow_db}"
    assert main(train_args(tiny_model_dir, tmp_path) + ["--tracking-uri", uri, "--experiment", "cli"]) == 0
    finals = dict(line.split(": ")[0:2] for line in capsys.readouterr().out.splitlines())
    tracking = MlflowResource(tracking_uri=uri, experiment="cli")
    client = tracking.client()
    runs = {r.info.run_name: r for r in client.search_runs([tracking.experiment_id()])}
    assert sorted(runs) == ["sft_tag-seed0", "sftkey_tag-seed0"]
    for name, run in runs.items():
        arm = name.removesuffix("-seed0")
        assert run.info.status == "FINISHED"
        assert finals[f"{arm} seed 0"].startswith(run.data.tags[FINAL_CHECKPOINT_TAG])
        assert (run.data.params["train.lr"], run.data.tags["sftkey.arm"]) == ("0.001", arm)
        rows = read_metrics(tmp_path / "runs" / arm / "seed0" / "metrics.jsonl")
        history = sorted((m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert history == [(row["step"], history[i][1]) for i, row in enumerate(rows)]
        assert len({stamp for _, stamp in history}) == len(rows)  # live: one timestamp per step
        assert all(abs(row["time"] * 1000 - stamp) < 1000 for row, (_, stamp) in zip(rows, history))
    # 24 examples / batch 8: 3 steps per stage; sftkey_tag's stage 1 is sft_tag's (reused): its own stage 2 only
    assert [m.step for m in client.get_metric_history(runs["sftkey_tag-seed0"].info.run_id, "loss")] == [4, 5, 6]


def test_sftkey_train_tracking_guards(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from sftkey.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = train_args(tiny_model_dir, tmp_path)
    assert main(args + ["--tracking-uri", "http://127.0.0.1:9"]) == 2  # nothing listens on the discard port
    err = capsys.readouterr().err
    assert err.startswith("sftkey train: error: MLflow tracking store http://127.0.0.1:9 did not answer")
    assert not (tmp_path / "runs").exists()  # refused before any training

    monkeypatch.setitem(sys.modules, "orchestration.telemetry", None)  # as if orchestration were not installed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "sftkey train: error: --tracking-uri: logging to MLflow needs mlflow and this project's orchestration "
        "package (import of orchestration.telemetry halted; None in sys.modules); install them with `pip install "
        "-e .` in the sftkey checkout, or drop --tracking-uri (and unset MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_during_a_tracking_write_lands_after_it():
    from orchestration.telemetry import signals_deferred

    written = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has arrived: Python runs handlers between bytecodes
            written.append("whole")  # the write goes on to its end
    assert written == ["whole"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as it was
    with signals_deferred():  # no signal: nothing raised
        written.append("again")
    assert written == ["whole", "again"]
