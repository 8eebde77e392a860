"""Run the whole asset graph as ONE Dagster run of the job `sftkey_pipeline`: data, every arm x seed cell (as many at
once as `compute.concurrency` / the device pool allows), then the comparison and the registry. One MLflow parent run
holds the asset runs; this pipeline run's own outputs go to `<work_dir>/runs/<pipeline run>/`, so two pipeline runs
at once never overwrite each other's.

Crashes: SIGINT/SIGTERM end this run's MLflow runs KILLED and its Dagster run failed before the process exits;
runs left RUNNING by a process that is gone (kill -9) are reaped by the next pipeline run, found by the pid and
host tagged on them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from orchestration.config import PipelineConfig, resources
from orchestration.definitions import PIPELINE_JOB
from orchestration.tracking import MlflowTracker, process_alive, redact, redact_values
from sftkey.cpu_threads import THREADS_ENV, cpu_cores
from sftkey.errors import UserError

CONSOLE_LOG_LEVEL = "WARNING"  # Dagster's per-event DEBUG lines drown the summary; `--verbose` shows them


class PipelineFailed(UserError, RuntimeError):
    """A step of the graph failed; the message names the step and its error."""

    exit_code = 1


class PipelineInterrupt(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM; a BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class PipelineInterrupted(UserError):
    """The pipeline was stopped by a signal; its runs are marked killed. Exit 128 + the signal, as a shell does."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


PIPELINE_RUN_TAG = "sftkey/pipeline_run"  # Dagster run tags: the pipeline run, and the process that owns the run
PID_TAG = "sftkey/pid"
HOST_TAG = "sftkey/host"
REAPED_TAG = "sftkey/reaped"
UNFINISHED = ("NOT_STARTED", "STARTING", "STARTED", "CANCELING")  # Dagster run statuses a dead process leaves


class SignalWatch:
    """SIGINT and SIGTERM raise PipelineInterrupt in the main thread. While Dagster executes a step it installs its
    own handlers (and ends its run itself), so the signals are also recorded through a wakeup fd it leaves alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict = {}
        self._pipe: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1

    def __enter__(self) -> "SignalWatch":
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            return self
        self._pipe = socket.socketpair()
        for end in self._pipe:
            end.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._pipe[1].fileno(), warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._raise)
        return self

    def _raise(self, signum: int, frame) -> None:
        raise PipelineInterrupt(signum)

    def seen(self) -> int | None:
        """The first SIGINT/SIGTERM received so far, or None."""
        if self._pipe:
            with contextlib.suppress(BlockingIOError):
                self.received += [n for n in self._pipe[0].recv(1024) if n in self.SIGNALS]
        return self.received[0] if self.received else None

    def check(self) -> None:
        if self.seen() is not None:
            raise PipelineInterrupt(self.received[0])

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        self.seen()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        for end in self._pipe:
            end.close()
        self._pipe = None


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Cleanup that marks runs killed is not itself cut short by a second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SignalWatch.SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def reap_dagster_runs(instance, reaper: str) -> list[str]:
    """Mark FAILURE the unfinished Dagster runs of this host whose process is gone (a killed pipeline); runs of a
    live process or another host are left alone. Returns the run ids marked."""
    import dagster as dg

    host = socket.gethostname()
    statuses = [dg.DagsterRunStatus(s) for s in UNFINISHED]
    reaped = []
    for run in instance.get_runs(dg.RunsFilter(statuses=statuses, tags={HOST_TAG: host})):
        pid = int(run.tags.get(PID_TAG, "0") or 0)
        if pid and not process_alive(pid):
            why = f"process {pid} on {host} was gone; marked failed by {reaper}"
            instance.add_run_tags(run.run_id, {REAPED_TAG: why})
            instance.report_run_failed(run, message=why)
            # the pool slots its steps held die with it: a dead run's slot would hold the next run's cells forever
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            reaped.append(run.run_id)
    return reaped


def cancel_open_dagster_runs(instance, pipeline_run: str, why: str) -> None:
    """The runs of this pipeline run left unfinished by an interrupt outside Dagster's own handling."""
    import dagster as dg

    statuses = [dg.DagsterRunStatus(s) for s in UNFINISHED]
    for run in instance.get_runs(dg.RunsFilter(statuses=statuses, tags={PIPELINE_RUN_TAG: pipeline_run})):
        instance.report_run_canceled(run, message=why)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


@dataclass
class PipelineResult:
    pipeline_run: str
    parent_run_id: str
    run_dir: Path
    comparison: dict | None = None
    registered: dict | None = None
    decision: dict[str, str] = field(default_factory=dict)  # the candidate version's promotion.* tags
    seconds: float = 0.0
    promoted: bool = False  # the candidate is @champion after this run (moved now, or it already was)
    promotion_reason: str = ""  # the gate's reason, or the compare-and-set's when the champion changed meanwhile
    failed_checks: list[str] = field(default_factory=list)  # ERROR-severity checks that failed, any cell


def new_pipeline_run_name(config: PipelineConfig) -> str:
    return f"{config.sections.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def dagster_instance(config: PipelineConfig):
    """The project's Dagster instance (DAGSTER_HOME, default `<work_dir>/dagster`): the UI shows these runs."""
    import dagster as dg

    from orchestration.instance import write_instance_yaml

    home = Path(os.environ.get("DAGSTER_HOME") or config.work_dir / "dagster")
    write_instance_yaml(home, config)  # the `dagster:` section: storage, run queue; no telemetry, no sign-up dialog
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def quiet_libraries() -> None:
    """Progress bars and chatter of the libraries the assets call; the runner prints one line per step."""
    import logging

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    hf_logging.disable_progress_bar()
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "creating initial database tables"


def log_pipeline_config(run, config: PipelineConfig) -> None:
    """The parent run holds the whole resolved config (params) and the YAML file as written (artifact), both with
    credentials (a tracking URI's password or token) redacted."""
    import tempfile
    from dataclasses import asdict

    run.log_params(redact_values({"pipeline": asdict(config.sections), "training": asdict(config.training)}))
    if config.path:
        with tempfile.TemporaryDirectory(prefix="sftkey-config-") as tmp:
            copy = Path(tmp) / Path(config.path).name
            copy.write_text(redact(Path(config.path).read_text(encoding="utf-8")), encoding="utf-8")
            run.log_artifact(copy)


def _failure(result) -> str:
    """One line: the failed step and the root cause of its error (the full trace stays in the Dagster run)."""
    for event in result.all_events:
        if event.is_step_failure:
            return (f"step {event.step_key}: {root_cause(event.step_failure_data.error)} (trace: Dagster run "
                    f"{result.run_id}, in `sftkey ui` or with --verbose)")
    return f"the run failed (Dagster run {result.run_id}; see `sftkey ui`)"


def _user_error_names(cls: type = UserError) -> set[str]:
    return {cls.__name__}.union(*(_user_error_names(sub) for sub in cls.__subclasses__()))


def root_cause(error) -> str:
    """The innermost error of a SerializableErrorInfo chain (Dagster wraps the asset's error in
    DagsterExecutionStepExecutionError): a UserError as its own message, anything else as `Type: message`."""
    if error is None:
        return "failed"
    while error.cause is not None or (error.context is not None and error.cls_name.startswith("Dagster")):
        error = error.cause or error.context
    text = " ".join(error.message.split())
    own = text.split(": ", 1)[1] if text.split(": ", 1)[0].endswith(error.cls_name) and ": " in text else text
    return redact(own if error.cls_name in _user_error_names() else f"{error.cls_name}: {own}")


@dataclass
class _Progress:
    """How far a pipeline run got: what an interrupt has to mark killed."""

    name: str
    stage: str = "pre-flight"
    tracking: object | None = None  # MlflowResource
    parent: str | None = None
    instance: object | None = None


def run_pipeline(config: PipelineConfig, echo: Callable[[str], None] = print, instance=None,
                 log_level: str = CONSOLE_LOG_LEVEL) -> PipelineResult:
    """Materialize the graph for `config`; raises PipelineFailed, TrackingUnavailable (before any work) or, on
    SIGINT/SIGTERM, PipelineInterrupted after marking its MLflow runs KILLED and its Dagster runs failed/canceled."""
    progress = _Progress(new_pipeline_run_name(config))
    try:
        with SignalWatch() as watch:
            return _run_pipeline(config, echo, instance, log_level, watch, progress)
    except PipelineInterrupt as interrupt:
        name = signal.Signals(interrupt.signum).name
        with signals_ignored(), contextlib.suppress(Exception):  # best effort: the next run reaps what is left
            _end_runs(progress, "KILLED", f"interrupted by {name}")
        marked = f"; MLflow run {progress.parent} marked KILLED" if progress.parent else ""
        raise PipelineInterrupted(interrupt.signum, f"interrupted by {name} during {progress.stage}{marked}. "
                                  "Run the same command again to resume: finished steps are reused") from None
    except BaseException:
        with signals_ignored(), contextlib.suppress(Exception):  # never hide the error being raised
            _end_runs(progress, "FAILED", "the pipeline process failed")
        raise


def _end_runs(progress: _Progress, status: str, why: str) -> None:
    """End this pipeline run's MLflow parent and asset runs still RUNNING, and cancel its unfinished Dagster runs."""
    tracking = progress.tracking
    if tracking is not None and progress.parent:
        tracking.end_open_children(progress.parent, status)
        if tracking.client().get_run(progress.parent).info.status == "RUNNING":
            tracking.end_run(progress.parent, status)
    if progress.instance is not None:
        cancel_open_dagster_runs(progress.instance, progress.name, why)


def reap(tracking, instance, reaper: str, echo: Callable[[str], None]) -> None:
    """Runs left RUNNING/STARTED by a pipeline process that is gone (kill -9, a crash) are marked killed/failed."""
    mlflow_runs, dagster_runs = tracking.reap_dead_runs(reaper), reap_dagster_runs(instance, reaper)
    if mlflow_runs or dagster_runs:
        echo(f"marked {len(mlflow_runs)} MLflow run(s) KILLED and {len(dagster_runs)} Dagster run(s) failed: "
             "left running by a pipeline process that is gone")


def _run_pipeline(config: PipelineConfig, echo: Callable[[str], None], instance, log_level: str,
                  watch: SignalWatch, progress: _Progress) -> PipelineResult:
    started = time.monotonic()
    quiet_libraries()
    name = progress.name
    preflight = resources(config)["tracking"]
    preflight.resolve_uri()  # an unreachable MLflow fails here, before any data or training
    progress.tracking = preflight
    parent = progress.parent = preflight.start_pipeline_run(name, {"sftkey.config": str(config.path or "")})
    log_pipeline_config(MlflowTracker(preflight.client(), parent), config)
    instance = progress.instance = instance or dagster_instance(config)
    reap(preflight, instance, name, echo)
    res = resources(config, name, parent, tracking_uri=preflight.resolve_uri())
    result = PipelineResult(name, parent, res["store"].run_folder())

    cells, limit = len(config.arms) * len(config.seeds), set_pool_limit(instance, config)
    echo(f"[{time.monotonic() - started:6.1f} s] one Dagster run of {PIPELINE_JOB}: data -> {cells} arm x seed "
         f"cell(s), {limit} at once -> comparison -> registry")
    progress.stage = f"the {PIPELINE_JOB} run"
    outcome = execute(config, instance, name, parent, preflight.resolve_uri(), limit, log_level)
    watch.check()  # a signal during the run: Dagster ended the run, the pipeline stops here
    result.failed_checks += _failed_checks(outcome)
    if not outcome.success and not _only_gate_failed(outcome):
        preflight.end_run(parent, "FAILED")
        raise PipelineFailed(_failure(outcome))
    result.comparison = load_value(config, res, instance, "arm_comparison")
    result.registered = load_value(config, res, instance, "registered_model")
    version = res["tracking"].client().get_model_version(result.registered["name"], result.registered["version"])
    result.decision = {k: v for k, v in version.tags.items() if k.startswith("promotion.")}
    result.promoted, result.promotion_reason = _promotion(outcome, config, res, instance)
    preflight.end_run(parent, "FINISHED")
    result.seconds = time.monotonic() - started
    return result


def set_pool_limit(instance, config: PipelineConfig) -> int:
    """The device pool's limit (cells at once) as the config asks; returns it. The limit is the instance's: a UI
    launch afterwards runs under the same pool."""
    from orchestration.definitions import first_stage_owners
    from orchestration.devices import device_kind, pool_limit, pool_name

    compute = config.sections.compute
    kind = device_kind(compute.device)
    independent = len(config.arms) * len(config.seeds) - len(first_stage_owners(config))
    limit = pool_limit(kind, compute.num_processes, compute.concurrency, independent)
    instance.event_log_storage.set_concurrency_slots(pool_name(kind), limit)
    return limit


def execute(config: PipelineConfig, instance, name: str, parent: str, tracking_uri: str, limit: int, log_level: str):
    """One run of the `sftkey_pipeline` job: in this process when one cell runs at a time, else each step in its own
    process (rebuilding the job from the run's spec) with the device pool bounding the cells."""
    import dagster as dg

    from orchestration.definitions import run_spec

    in_process = limit == 1 and config.sections.compute.concurrency is None  # the default on one CPU: no spawns
    # Step processes fork from a server that has imported the graph once: a spawned step re-imports torch,
    # transformers, dagster and mlflow (seconds each on a small machine).
    forkserver = {"forkserver": {"preload_modules": ["orchestration.definitions", "orchestration.telemetry"]}}
    executor = {"in_process": {}} if in_process else {
        "multiprocess": {"max_concurrent": max(2, limit), "start_method": forkserver}}
    run_config = {"execution": {"config": executor}, "loggers": {"console": {"config": {"log_level": log_level}}}}
    job = dg.build_reconstructable_job("orchestration.definitions", "pipeline_job",
                                       reconstructable_args=(run_spec(config, name, parent, tracking_uri),))
    # cells side by side share the cores: each step's work threads (sftkey.cpu_threads) get its share. Speed only:
    # no result depends on the thread count. (A forkserver started by an earlier run in this process keeps its share.)
    share = {} if in_process else {THREADS_ENV: str(max(1, cpu_cores() // limit))}
    with scoped_environ(share), dg.execute_job(job, instance=instance, run_config=run_config, raise_on_error=False,
                        tags={PIPELINE_RUN_TAG: name, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
                        ) as outcome:
        return outcome


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]):
    """os.environ with `values` set for the block, then as it was."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_value(config: PipelineConfig, res: dict, instance, asset: str):
    """An asset's stored value (this run's io manager), e.g. arm_comparison's table."""
    from orchestration.definitions import build_definitions

    with build_definitions(config, res).get_asset_value_loader(instance=instance) as loader:
        return loader.load_asset_value(asset)


def _gate() -> tuple[str, str]:
    """(check name, step key) of the promotion gate."""
    from orchestration.checks import check_registered_model_promotion_gate as gate

    return gate.check_key.name, gate.node_def.name


def _only_gate_failed(outcome) -> bool:
    """The promotion gate refusing a candidate is an outcome, not a failure of the pipeline; an exception inside
    the gate (no decision made) is a failure."""
    failed = [e for e in outcome.all_events if e.is_step_failure]
    return ([e.step_key for e in failed] == [_gate()[1]] and failed[0].step_failure_data.error is not None
            and failed[0].step_failure_data.error.cls_name == "DagsterAssetCheckFailedError")


def _failed_checks(outcome) -> list[str]:
    """The ERROR-severity checks of a materialization that failed (the gate's refusal is reported apart)."""
    import dagster as dg

    from orchestration.checks import check_label

    return [check_label(e.check_name, e.asset_key) for e in outcome.get_asset_check_evaluations()
            if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR and e.check_name != _gate()[0]]


def _promotion(outcome, config: PipelineConfig, res: dict, instance) -> tuple[bool, str]:
    """(promoted, reason) after the run: the gate's refusal, or what champion_model's compare-and-set did."""
    gate = next((e for e in outcome.get_asset_check_evaluations() if e.check_name == _gate()[0]), None)
    if gate is None:
        return False, "the promotion gate did not run"
    if not gate.passed:
        return False, gate.description or "refused by the promotion gate"
    champion = load_value(config, res, instance, "champion_model")
    return champion["promoted"], champion["reason"]


def summary_lines(config: PipelineConfig, result: PipelineResult, ui_command: str = "sftkey ui") -> list[str]:
    """What `sftkey pipeline` prints at the end: the comparison, the decision, and where to look."""
    promoted, reason = result.promoted, result.promotion_reason or "no decision recorded"
    registered = result.registered or {}
    return [
        "", f"Comparison ({result.comparison['folder']}/comparison.md):", "", result.comparison["table"],
        f"Registry: {registered.get('name')} v{registered.get('version')} ({registered.get('arm')} seed "
        f"{registered.get('seed')}) is @challenger; {'promoted to @champion' if promoted else 'not promoted'}: {reason}",
        "",
        f"Pipeline run {result.pipeline_run} finished in {result.seconds:.0f} s. Where to look:",
        f"  {ui_command}",
        "      Dagster on http://127.0.0.1:3000 (asset graph, checks, metadata: counts, table, plots, MLflow links)",
        f"      MLflow on {redact(config.sections.tracking.ui_url)} (experiment {config.sections.tracking.experiment!r}: "
        f"parent run {result.pipeline_run}, models {registered.get('name')!r})",
        f"  this run's outputs:      {result.run_dir}",
        f"  checkpoints and scores:  {config.work_dir / 'store'}",
    ]
