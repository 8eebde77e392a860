"""Live training telemetry: each optimizer step's metrics reach MLflow as the step ends (with its real time), and a
progress line per stage ("sft_tag seed 0 stage1: step 12/40 loss 1.2340 tok/s 350 ETA 1m05s") reaches the Dagster
run log and the console, from a stage trained in process, from one launched through Dagster Pipes
(orchestration/launch_stage.py) and from `sftkey train --tracking-uri`.

metrics.jsonl stays the complete record: steps MLflow missed (a stage reused from an earlier run, the steps before a
resume, an MLflow outage mid-stage) are logged from it afterwards at the times it recorded (`log_missing_steps`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import dagster as dg

from orchestration.tracking import (MlflowResource, MlflowTracker, context_tags, is_interrupt, metric_name,
                                    owner_tags)

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROGRESS_EVERY_S = 10.0  # at most one progress line per stage this often (plus its first and last step)
LABEL_ENV = "SFTKEY_PROGRESS_LABEL"  # a launched stage's progress label
EVERY_ENV = "SFTKEY_PROGRESS_EVERY_S"
RUN_ID_ENV = "MLFLOW_RUN_ID"  # MLflow's own names: the launched process logs into this run of this store
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PROGRESS_LINE = re.compile(r": step \d+/\d+ loss ")  # how the console tells a progress line from other INFO lines
ROW_KEYS = ("type", "step", "time", "arm", "seed", "stage")  # metrics.jsonl row fields that are not metrics
STAGE_STATUS_TAG = "sftkey.stage_status"  # trained / reused
TRAINED_IN_TAG = "sftkey.trained_in_run"  # a reused stage: the MLflow run that trained it, when this store has it

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- progress lines


def format_duration(seconds: float) -> str:
    """45s, 1m05s, 2h03m; ? when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(label: str, step: int, total: int, loss: float, tokens_per_s: float, eta_s: float) -> str:
    return f"{label}: step {step}/{total} loss {loss:.4f} tok/s {tokens_per_s:.0f} ETA {format_duration(eta_s)}"


@dataclass
class StageClock:
    """Where a stage is: its steps, the global step of its step 0, where this process started it, and when."""

    name: str
    steps: int
    offset: int
    start: int
    started: float = field(default_factory=time.monotonic)

    def eta_s(self, local_step: int) -> float:
        done = local_step - self.start
        return (time.monotonic() - self.started) / done * (self.steps - local_step) if done > 0 else math.inf


# --------------------------------------------------------------------------- the step tracker


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM during the block is delivered after it: a write to a SQLite tracking store cut mid-commit
    keeps the database locked, and the run could then not be marked KILLED (`sftkey train` died with a traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in dict.fromkeys(caught):  # once each, now that the write is whole
            signal.raise_signal(signum)


class StepTracker(MlflowTracker):
    """The trainer's Tracker writing to one MLflow run: one `log_batch` per optimizer step, stamped with the time
    it ended (distinct per step), and a progress line through `say` at a stage's first and last step and at most
    every `every_s` seconds between. Params, tags and artifacts go through to MlflowTracker.

    An MLflow error (an outage mid-stage) does not stop training: one warning, nothing more sent to MLflow, and
    the steps are logged from metrics.jsonl when the stage ends (`log_missing_steps`)."""

    def __init__(self, client: "MlflowClient", run_id: str, say: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None, label: str | None = None,
                 every_s: float = PROGRESS_EVERY_S):
        super().__init__(client, run_id)
        self.say, self.warn, self.label, self.every_s = say, warn or log.warning, label, every_s
        self.tags: dict[str, str] = {}
        self.stage: StageClock | None = None
        self.live = True
        self.last_stamp = 0  # ms of the last logged step
        self.last_said = -math.inf

    def log_params(self, params: dict[str, Any]) -> None:
        self._send("params", lambda: super(StepTracker, self).log_params(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})
        self._send("tags", lambda: super(StepTracker, self).set_tags(tags))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._send(f"artifact {path}", lambda: super(StepTracker, self).log_artifact(path, artifact_path))

    def _send(self, what: str, send: Callable[[], None]) -> bool:
        if not self.live:
            return False
        try:
            with signals_deferred():
                send()
            return True
        except Exception as error:  # an outage must not kill hours of training: metrics.jsonl has every step
            self.live = False
            self.warn(f"MLflow run {self.run_id}: logging {what} failed ({type(error).__name__}: "
                      f"{str(error)[:200]}); training goes on without MLflow, its steps are logged from "
                      "metrics.jsonl when the stage ends")
            return False

    def start_stage(self, stage: str, steps: int, offset: int, start: int) -> None:
        self.stage = StageClock(stage, steps, offset, start)
        self.last_said = -math.inf

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = step or 0
        stamp = max(int(time.time() * 1000), self.last_stamp + 1)  # two steps in one ms still get their own
        if self._send(f"step {step}", lambda: self.log_timed_metric_rows([(step, stamp, metrics)])):
            self.last_stamp = stamp
        self._report(metrics, step)

    def _report(self, metrics: dict[str, float], step: int) -> None:
        if self.say is None or self.stage is None or "loss" not in metrics:
            return
        local = step - self.stage.offset
        now = time.monotonic()
        if local not in (self.stage.start + 1, self.stage.steps) and now - self.last_said < self.every_s:
            return
        self.last_said = now
        self.say(progress_line(self._label(), local, self.stage.steps, metrics["loss"],
                               metrics.get("tokens_per_s", 0.0), self.stage.eta_s(local)))

    def _label(self) -> str:
        if self.label:
            return self.label
        arm, seed = self.tags.get("arm", "?"), self.tags.get("seed", "?")
        return f"{arm} seed {seed} {self.stage.name}"


@dataclass
class StageTelemetry:
    """What a training stage reports through: `tracker` in process, `env` for a launched stage's processes."""

    tracker: StepTracker
    env: dict[str, str]


def stage_telemetry(context: dg.AssetExecutionContext, run: MlflowTracker, label: str,
                    every_s: float = PROGRESS_EVERY_S) -> StageTelemetry:
    """The live telemetry of one stage logging into the asset's MLflow run `run`, with progress lines in the
    Dagster run log labelled `label` (e.g. "sft_tag seed 0 stage1")."""
    tracker = StepTracker(run.client, run.run_id, say=context.log.info, warn=context.log.warning, label=label,
                          every_s=every_s)
    env = {TRACKING_URI_ENV: absolute_uri(run.client.tracking_uri), RUN_ID_ENV: run.run_id, LABEL_ENV: label,
           EVERY_ENV: str(every_s)}
    return StageTelemetry(tracker, env)


def absolute_uri(tracking_uri: str) -> str:
    """A relative sqlite path made absolute: a launched process may start in another folder."""
    if tracking_uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(tracking_uri.removeprefix("sqlite:///")).resolve())
    return tracking_uri


def tracker_from_env(say: Callable[[str], None], warn: Callable[[str], None] | None = None,
                     env: dict[str, str] | None = None) -> StepTracker | None:
    """The StepTracker a launched stage's main process builds from `stage_telemetry(...).env`; None without it."""
    env = os.environ if env is None else env
    if not (env.get(TRACKING_URI_ENV) and env.get(RUN_ID_ENV)):
        return None
    from mlflow import MlflowClient

    return StepTracker(MlflowClient(env[TRACKING_URI_ENV]), env[RUN_ID_ENV], say=say, warn=warn,
                       label=env.get(LABEL_ENV), every_s=float(env.get(EVERY_ENV, PROGRESS_EVERY_S)))


# --------------------------------------------------------------------------- steps MLflow missed


def log_missing_steps(run: MlflowTracker, rows: list[dict]) -> int:
    """Log the metrics.jsonl `rows` whose step the run's loss history lacks, each at the time the trainer recorded
    (now for rows written before rows had times). Returns how many steps were logged."""
    logged = {m.step for m in run.client.get_metric_history(run.run_id, metric_name("loss"))}
    now = int(time.time() * 1000)
    missing = [(row["step"], int(row["time"] * 1000) if "time" in row else now,
                {k: v for k, v in row.items() if k not in ROW_KEYS}) for row in rows if row["step"] not in logged]
    if missing:
        run.log_timed_metric_rows(missing)
    return len(missing)


def reuse_tags(run: MlflowTracker, status: str, stage_key: str) -> dict[str, str]:
    """Tags saying whether the run trained its stage; a reused one names the run of this store that trained it."""
    tags = {STAGE_STATUS_TAG: status}
    if status != "reused":
        return tags
    experiment = run.client.get_run(run.run_id).info.experiment_id
    found = run.client.search_runs([experiment], f"tags.`sftkey.stage_key` = '{stage_key}' and "
                                   f"tags.`{STAGE_STATUS_TAG}` = 'trained'", max_results=1,
                                   order_by=["attributes.start_time ASC"])
    return tags | ({TRAINED_IN_TAG: found[0].info.run_id} if found else {})


# --------------------------------------------------------------------------- `sftkey train --tracking-uri`


def train_runs(tracking_uri: str, experiment: str) -> Callable[[str, int, Path], contextlib.AbstractContextManager]:
    """`sftkey train`'s MLflow runs: `runs(arm, seed, metrics_file)` opens one run per arm x seed and yields its
    StepTracker (params, live step metrics, tags); on exit the steps it missed are logged from `metrics_file` and
    the run ends FINISHED, FAILED or KILLED. The store is checked here, before any training (TrackingUnavailable)."""
    resource = MlflowResource(tracking_uri=tracking_uri, experiment=experiment)
    client = resource.client()
    experiment_id = resource.experiment_id()

    @contextlib.contextmanager
    def runs(arm: str, seed: int, metrics_file: Path) -> Iterator[StepTracker]:
        created = client.create_run(experiment_id, run_name=f"{arm}-seed{seed}",
                                    tags={**context_tags(), **owner_tags(), "sftkey.arm": arm,
                                          "sftkey.seed": str(seed)})
        tracker = StepTracker(client, created.info.run_id)  # the CLI's progress bar shows progress
        status = "FINISHED"
        try:
            yield tracker
        except BaseException as error:
            status = "KILLED" if is_interrupt(error) or type(error).__name__ == "Terminated" else "FAILED"
            raise
        finally:
            with contextlib.suppress(Exception):  # the training error matters more than a logging one
                if metrics_file.is_file():
                    from sftkey.train.tracking import read_metrics

                    log_missing_steps(tracker, read_metrics(metrics_file))
            client.set_terminated(created.info.run_id, status)

    return runs


# --------------------------------------------------------------------------- the console


class _ConsoleHandler(logging.Handler):
    """One line per record: progress lines as they are, other records at `threshold` and above as
    `LEVEL step: message`."""

    def __init__(self, threshold: int, progress: bool):
        super().__init__(logging.DEBUG)
        self.threshold, self.progress = threshold, progress

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        message = meta.get("orig_message") or record.getMessage()
        if self.progress and record.levelno == logging.INFO and PROGRESS_LINE.search(message):
            line = message
        elif record.levelno >= self.threshold:
            error = getattr(getattr(meta.get("dagster_event"), "event_specific_data", None), "error", None)
            while error is not None and error.cause is not None:  # Dagster's wrapper first, the user's error last
                error = error.cause
            line = f"{record.levelname} {meta.get('step_key') or 'run'}: {message}"
            line += f" {error.message.strip()}" if error is not None else ""
        else:
            return
        print(line, file=sys.stdout, flush=True)  # sys.stdout at emit time: a redirected stdout gets it


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dg.logger(
    config_schema={
        "log_level": dg.Field(dg.Enum("ConsoleLogLevel", [dg.EnumValue(n) for n in LOG_LEVELS]),
                              default_value="WARNING", is_required=False,
                              description="other events at this level and above are printed too"),
        "progress": dg.Field(bool, default_value=True, is_required=False,
                             description="print each stage's progress lines (step/total, loss, tok/s, ETA)"),
    },
    description="Compact console: training progress lines, and other Dagster events at log_level and above.",
)
def progress_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    threshold = logging.getLevelName(init_context.logger_config["log_level"])
    logger = logging.Logger("sftkey.progress_console", level=min(threshold, logging.INFO))
    logger.addHandler(_ConsoleHandler(threshold, init_context.logger_config["progress"]))
    return logger
