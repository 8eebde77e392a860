"""Asset checks: annotation coverage, examples dropped by the length limit, stage 2's answer loss falling, format
accuracy, answers cut by the length cap (a warning), and the promotion gate.

Each check's rule is a plain function of plain values returning (passed, metadata), so its failing path is tested
without Dagster; thresholds come from the pipeline YAML's `checks:` section. The gate is blocking: when it fails,
`champion_model` (which moves the registry's `champion` alias) does not run.
"""


import dagster as dg

from orchestration.assets import annotated_dataset, cell_key, registered_model, tokenized_dataset
from orchestration.config import PipelineSettings
from orchestration.tracking import MlflowResource


# ---------------------------------------------------------------------------------- the rules


def coverage_rule(kept: int, records: int, min_coverage: float) -> tuple[bool, dict]:
    """Kept records over loaded records is at least `min_coverage` (no records: 0 coverage)."""
    coverage = kept / records if records else 0.0
    return coverage >= min_coverage, {"coverage": coverage, "min_coverage": min_coverage}


def too_long_rule(by_format: dict[str, tuple[int, int]], max_share: float) -> tuple[bool, dict]:
    """In every format, (annotated records, dropped as too long) drops at most `max_share` of the records."""
    shares = {fmt: (too_long / annotated if annotated else 0.0) for fmt, (annotated, too_long) in by_format.items()}
    worst = max(shares.values(), default=0.0)
    return worst <= max_share, {"too_long_share": worst, "max_too_long_share": max_share,
                                **{f"{fmt}.too_long_share": share for fmt, share in shares.items()}}


def loss_drop_rule(losses: list[tuple[int, float]], min_drop: float) -> tuple[bool, dict]:
    """The loss ends below its start by at least `min_drop` (a fraction of the start): the mean of the last quarter
    of the logged steps against the mean of the first quarter (one step each for fewer than 8). No steps: n/a."""
    if not losses:
        return True, {"steps": 0}
    window = max(1, len(losses) // 4)
    start = sum(loss for _, loss in losses[:window]) / window
    end = sum(loss for _, loss in losses[-window:]) / window
    drop = (start - end) / start if start > 0 else 0.0
    passed = end < start and drop >= min_drop
    return passed, {"steps": len(losses), "start": start, "end": end, "drop": drop, "min_drop": min_drop}


def minimum_rule(name: str, value: float | None, minimum: float) -> tuple[bool, dict]:
    """`value` is at least `minimum`; None (not applicable) passes."""
    if value is None:
        return True, {name: "n/a", f"min_{name}": minimum}
    return value >= minimum, {name: value, f"min_{name}": minimum}


def maximum_rule(name: str, value: float, maximum: float) -> tuple[bool, dict]:
    """`value` is at most `maximum`."""
    return value <= maximum, {name: value, f"max_{name}": maximum}


# ---------------------------------------------------------------------------------- the checks


@dg.asset_check(asset=annotated_dataset, description="kept records / loaded records is at least "
                                                     "checks.min_annotation_coverage")
def check_annotated_dataset_coverage(settings: PipelineSettings, annotated_dataset: dict) -> dg.AssetCheckResult:
    passed, metadata = coverage_rule(annotated_dataset["kept"], annotated_dataset["records"],
                                     settings.config.checks.min_annotation_coverage)
    return dg.AssetCheckResult(passed=passed, metadata={
        **metadata, "exclusions_by_reason": dg.MetadataValue.json(annotated_dataset["exclusions_by_reason"])})


@dg.asset_check(asset=tokenized_dataset, description="in every response format, at most checks.max_too_long_share "
                                                     "of the annotated records exceed training.data.max_length")
def check_tokenized_dataset_too_long(settings: PipelineSettings, tokenized_dataset: dict) -> dg.AssetCheckResult:
    by_format = {fmt: (entry["annotated"], entry["too_long"]) for fmt, entry in tokenized_dataset["formats"].items()}
    passed, metadata = too_long_rule(by_format, settings.config.checks.max_too_long_share)
    return dg.AssetCheckResult(passed=passed, metadata=metadata)


# The cells' checks: plain functions of the asset's value, bound to each cell's asset by cell_checks.


def check_stage2_model_answer_loss(settings: PipelineSettings, stage2_model: dict) -> dg.AssetCheckResult:
    passed, metadata = loss_drop_rule(stage2_model["answer_losses"], settings.config.checks.min_answer_loss_drop)
    return dg.AssetCheckResult(passed=passed, metadata=metadata,
                               description=None if stage2_model["answer_losses"] else "n/a: no second stage")


def check_benchmark_scores_format_accuracy(settings: PipelineSettings, benchmark_scores: dict) -> dg.AssetCheckResult:
    accuracy = benchmark_scores["metrics"]["format_accuracy"]
    passed, metadata = minimum_rule("format_accuracy", accuracy, settings.config.checks.min_format_accuracy)
    return dg.AssetCheckResult(passed=passed, metadata=metadata,  # the plain arm writes no tags: nothing to check
                               description="n/a: untagged (plain) arm" if accuracy is None else None)


def check_benchmark_scores_length_cap(settings: PipelineSettings, benchmark_scores: dict) -> dg.AssetCheckResult:
    passed, metadata = maximum_rule("length_cap_share", benchmark_scores["metrics"]["length_cap_share"],
                                    settings.config.checks.max_length_cap_share)
    return dg.AssetCheckResult(
        passed=passed, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(benchmark_scores.get("warnings", [])) or None,
        metadata={**metadata, "max_new_tokens": benchmark_scores.get("max_new_tokens") or -1})


CELL_CHECKS = {  # (asset, rule, description) by check name
    "check_stage2_model_answer_loss": (
        "stage2_model", check_stage2_model_answer_loss,
        "stage 2's answer loss ends below its start (by checks.min_answer_loss_drop); n/a for a one-stage arm"),
    "check_benchmark_scores_format_accuracy": (
        "benchmark_scores", check_benchmark_scores_format_accuracy,
        "format accuracy is at least checks.min_format_accuracy"),
    "check_benchmark_scores_length_cap": (
        "benchmark_scores", check_benchmark_scores_length_cap,
        "at most checks.max_length_cap_share of the answers were cut by the new-token cap (a warning: their accuracy "
        "is a floor, the run is not broken)"),
}


def cell_checks(arm: str, seed: int) -> list[dg.AssetChecksDefinition]:
    """The checks of one arm x seed cell's assets (each evaluates its cell's value with the rule above)."""
    def bind(name: str, asset: str, rule, description: str) -> dg.AssetChecksDefinition:
        decorate = dg.asset_check(asset=cell_key(arm, seed, asset), name=name, description=description)
        if asset == "stage2_model":  # Dagster loads the asset's value into the parameter named like the asset
            def on_stage2(settings: PipelineSettings, stage2_model: dict) -> dg.AssetCheckResult:
                return rule(settings, stage2_model)
            return decorate(on_stage2)

        def on_benchmark(settings: PipelineSettings, benchmark_scores: dict) -> dg.AssetCheckResult:
            return rule(settings, benchmark_scores)
        return decorate(on_benchmark)

    return [bind(name, asset, rule, description) for name, (asset, rule, description) in CELL_CHECKS.items()]


DATA_CHECKS = [check_annotated_dataset_coverage, check_tokenized_dataset_too_long]


def gated_check_keys(arm: str, seed: int) -> list[dg.AssetCheckKey]:
    """The checks whose ERROR-severity failure bars the candidate arm x seed: the data checks and its cell's."""
    return [key for check in DATA_CHECKS for key in check.check_keys] + [
        dg.AssetCheckKey(cell_key(arm, seed, asset), name) for name, (asset, _, _) in CELL_CHECKS.items()]


def failed_checks(instance: dg.DagsterInstance, run_tags: dict, keys: list[dg.AssetCheckKey]) -> list[str]:
    """The ERROR-severity checks among `keys` that failed: the latest evaluation of each (within this pipeline
    run's Dagster runs when it has any), named with the cell ("[arm|seed]") for a cell's check. WARN failures
    pass."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status

    from orchestration.pipeline import PIPELINE_RUN_TAG  # on every Dagster run of one `sftkey pipeline` run

    run_ids = None
    if run_tags.get(PIPELINE_RUN_TAG):
        runs = instance.get_runs(filters=dg.RunsFilter(tags={PIPELINE_RUN_TAG: run_tags[PIPELINE_RUN_TAG]}))
        run_ids = {run.run_id for run in runs}
    failed = []
    for key in keys:
        history = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=100, status={Status.SUCCEEDED, Status.FAILED})
        for record in history:  # newest first
            evaluation = record.event.asset_check_evaluation if record.event else None
            if evaluation is None or (run_ids is not None and record.run_id not in run_ids):
                continue
            if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                failed.append(check_label(key.name, key.asset_key))
            break
    return failed


def check_label(check: str, asset_key: dg.AssetKey) -> str:
    """A check as the summary and the gate's reason name it: with its cell for a cell's asset
    (sft_tag/seed0/benchmark_scores -> "check_benchmark_scores_format_accuracy [sft_tag|0]")."""
    if len(asset_key.path) != 3:
        return check
    arm, seed, _ = asset_key.path
    return f"{check} [{arm}|{seed.removeprefix('seed')}]"


@dg.asset_check(asset=registered_model, blocking=True,
                description="the candidate passed every check and beats the champion on the same benchmark by the "
                            "margin with a significant paired test, or reaches min_accuracy when there is no "
                            "champion; records the decision and evidence as version tags")
def check_registered_model_promotion_gate(context: dg.AssetCheckExecutionContext, settings: PipelineSettings,
                                          registered_model: dict, tracking: MlflowResource) -> dg.AssetCheckResult:
    from orchestration.registry import evaluate_gate

    promotion = settings.config.promotion
    keys = gated_check_keys(registered_model["arm"], int(registered_model["seed"]))
    failed = failed_checks(context.instance, dict(context.run.tags), keys)
    decision = evaluate_gate(tracking.client(), registered_model["name"], registered_model["version"],
                             promotion.margin_points, promotion.alpha, promotion.min_accuracy, failed)
    return dg.AssetCheckResult(passed=decision.promote, description=decision.reason, metadata={
        "decision": "promote" if decision.promote else "refuse", "reason": decision.reason,
        "candidate_accuracy": decision.candidate_accuracy,
        "champion_accuracy": decision.champion_accuracy if decision.champion_accuracy is not None else float("nan"),
        "champion_version": decision.champion_version or "none",
        "p_value": decision.p_value if decision.p_value is not None else float("nan"),
        "margin_points": decision.margin_points, "min_accuracy": decision.min_accuracy,
        "failed_checks": ", ".join(decision.failed_checks) or "none",
    })


def pipeline_checks(arms: list[str], seeds: list[int]) -> list[dg.AssetChecksDefinition]:
    """Every check of a config's graph: the data checks, each cell's, and the promotion gate."""
    cells = [check for arm in arms for seed in seeds for check in cell_checks(arm, seed)]
    return [*DATA_CHECKS, *cells, check_registered_model_promotion_gate]
