"""Run the whole asset graph in this process: data, then every arm x seed partition, then the comparison and
the registry. One MLflow parent run holds the asset runs; this pipeline run's own outputs go to
`<work_dir>/runs/<pipeline run>/`, so two pipeline runs at once never overwrite each other's.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestration.config import PipelineConfig, resources, run_config
from orchestration.tracking import MlflowTracker
from sftkey.errors import UserError

CONSOLE_LOG_LEVEL = "WARNING"  # Dagster's per-event DEBUG lines drown the summary; `--verbose` shows them


class PipelineFailed(UserError, RuntimeError):
    """A step of the graph failed; the message names the step and its error."""

    exit_code = 1


@dataclass
class PipelineResult:
    pipeline_run: str
    parent_run_id: str
    run_dir: Path
    comparison: dict | None = None
    registered: dict | None = None
    decision: dict[str, str] = field(default_factory=dict)  # the candidate version's promotion.* tags
    seconds: float = 0.0


def new_pipeline_run_name(config: PipelineConfig) -> str:
    return f"{config.sections.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def dagster_instance(config: PipelineConfig):
    """The project's Dagster instance (DAGSTER_HOME, default `<work_dir>/dagster`): the UI shows these runs."""
    import dagster as dg

    home = Path(os.environ.get("DAGSTER_HOME") or config.work_dir / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # default storage (sqlite here); no telemetry, no sign-up dialog
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def add_partitions(instance, config: PipelineConfig) -> None:
    """Register the config's arms and seeds as partitions (dynamic: each config brings its own)."""
    for dimension, keys in (("arm", config.arms), ("seed", [str(s) for s in config.seeds])):
        missing = [k for k in keys if not instance.has_dynamic_partition(dimension, k)]
        if missing:
            instance.add_dynamic_partitions(dimension, missing)


def quiet_libraries() -> None:
    """Progress bars and chatter of the libraries the assets call; the runner prints one line per step."""
    import logging

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    hf_logging.disable_progress_bar()
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "creating initial database tables"


def log_pipeline_config(run, config: PipelineConfig) -> None:
    """The parent run holds the whole resolved config (params) and the YAML file as written (artifact)."""
    from dataclasses import asdict

    run.log_params({"pipeline": asdict(config.sections), "training": asdict(config.training)})
    if config.path:
        run.log_artifact(config.path)


def _failure(result) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            return f"step {event.step_key}: {error.message.strip() if error else 'failed'}"
    return "the run failed (see the Dagster UI)"


def run_pipeline(config: PipelineConfig, echo: Callable[[str], None] = print, instance=None,
                 log_level: str = CONSOLE_LOG_LEVEL) -> PipelineResult:
    """Materialize the graph for `config`; raises PipelineFailed (or TrackingUnavailable before any work)."""
    import dagster as dg

    from orchestration.checks import ALL_CHECKS
    from orchestration.definitions import ALL_ASSETS, DATA_ASSETS, PARTITIONED_ASSETS, REPORT_ASSETS, op_config_for

    started = time.monotonic()
    quiet_libraries()
    name = new_pipeline_run_name(config)
    preflight = resources(config)["tracking"]
    preflight.resolve_uri()  # an unreachable MLflow fails here, before any data or training
    parent = preflight.start_pipeline_run(name, {"sftkey.config": str(config.path or "")})
    log_pipeline_config(MlflowTracker(preflight.client(), parent), config)
    instance = instance or dagster_instance(config)
    add_partitions(instance, config)
    res = resources(config, name, parent, tracking_uri=preflight.resolve_uri())
    base = run_config(config)
    loggers = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    result = PipelineResult(name, parent, res["store"].run_folder())
    graph = ALL_ASSETS + ALL_CHECKS

    def materialize(selection: list, label: str, partition_key=None, expect_gate: bool = False):
        echo(f"[{time.monotonic() - started:6.1f} s] {label}")
        outcome = dg.materialize(graph, selection=selection, partition_key=partition_key, instance=instance,
                                 resources=res, run_config=op_config_for(base, selection) | loggers,
                                 raise_on_error=False,
                                 tags={"sftkey/pipeline_run": name})
        if not outcome.success and not (expect_gate and _only_gate_failed(outcome)):
            preflight.end_run(parent, "FAILED")
            raise PipelineFailed(f"{label}: {_failure(outcome)}")
        return outcome

    materialize(DATA_ASSETS, "data: raw_dataset -> annotated_dataset -> tokenized_dataset")
    for arm in config.arms:
        for seed in config.seeds:
            key = dg.MultiPartitionKey({"arm": arm, "seed": str(seed)})
            materialize(PARTITIONED_ASSETS, f"{arm} seed {seed}: stage1_model -> stage2_model -> benchmark_scores",
                        partition_key=key)
    outcome = materialize(REPORT_ASSETS, "arm_comparison -> registered_model -> promotion gate -> champion_model",
                          expect_gate=True)
    result.comparison = outcome.output_for_node("arm_comparison")
    result.registered = outcome.output_for_node("registered_model")
    version = res["tracking"].client().get_model_version(result.registered["name"], result.registered["version"])
    result.decision = {k: v for k, v in version.tags.items() if k.startswith("promotion.")}
    preflight.end_run(parent, "FINISHED")
    result.seconds = time.monotonic() - started
    return result


def _only_gate_failed(outcome) -> bool:
    """The promotion gate refusing a candidate is an outcome, not a failure of the pipeline."""
    failed = [e.step_key for e in outcome.all_events if e.is_step_failure]
    return failed == ["registered_model_check_registered_model_promotion_gate"]


def summary_lines(config: PipelineConfig, result: PipelineResult, ui_command: str = "sftkey ui") -> list[str]:
    """What `sftkey pipeline` prints at the end: the comparison, the decision, and where to look."""
    import json

    decision = result.decision
    promoted = decision.get("promotion.decision") == "promoted"
    registered = result.registered or {}
    reason = json.loads(decision["promotion.reason"]) if "promotion.reason" in decision else "no decision recorded"
    return [
        "", f"Comparison ({result.comparison['folder']}/comparison.md):", "", result.comparison["table"],
        f"Registry: {registered.get('name')} v{registered.get('version')} ({registered.get('arm')} seed "
        f"{registered.get('seed')}) is @challenger; {'promoted to @champion' if promoted else 'not promoted'}: {reason}",
        "",
        f"Pipeline run {result.pipeline_run} finished in {result.seconds:.0f} s. Where to look:",
        f"  {ui_command}",
        "      Dagster on http://127.0.0.1:3000 (asset graph, checks, metadata: counts, table, plots, MLflow links)",
        f"      MLflow on {config.sections.tracking.ui_url} (experiment {config.sections.tracking.experiment!r}: "
        f"parent run {result.pipeline_run}, models {registered.get('name')!r})",
        f"  this run's outputs:      {result.run_dir}",
        f"  checkpoints and scores:  {config.work_dir / 'store'}",
    ]
