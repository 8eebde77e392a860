"""Asset checks: annotation coverage, finite training losses, format accuracy, answers cut by the length cap (a
warning), and the promotion gate.

The gate is blocking: when it fails, `champion_model` (which moves the registry's `champion` alias) does not run.
"""


import math
import warnings

import dagster as dg

from orchestration.assets import ARM_SEED, annotated_dataset, benchmark_scores, registered_model, stage1_model, stage2_model
from orchestration.config import CoverageCheckConfig, FormatCheckConfig, GateCheckConfig
from orchestration.tracking import MlflowResource

# Checks partitioned like their asset (one evaluation per arm x seed) are "preview" in Dagster 1.13.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)


@dg.asset_check(asset=annotated_dataset, description="kept records / loaded records is at least min_coverage")
def check_annotated_dataset_coverage(config: CoverageCheckConfig, annotated_dataset: dict) -> dg.AssetCheckResult:
    coverage = annotated_dataset["coverage"]
    return dg.AssetCheckResult(passed=coverage >= config.min_coverage, metadata={
        "coverage": coverage, "min_coverage": config.min_coverage,
        "exclusions_by_reason": dg.MetadataValue.json(annotated_dataset["exclusions_by_reason"]),
    })


def _loss_check(model: dict) -> dg.AssetCheckResult:
    """Every logged loss of the stage is finite (a skipped stage has none and passes)."""
    losses = model.get("losses", [])
    bad = [(step, loss) for step, loss in losses if not math.isfinite(loss)]
    return dg.AssetCheckResult(passed=not bad, metadata={
        "logged_losses": len(losses), "non_finite": len(bad),
        "first_non_finite_step": bad[0][0] if bad else -1,
        "final_loss": losses[-1][1] if losses else float("nan"),
    })


@dg.asset_check(asset=stage1_model, partitions_def=ARM_SEED, description="no NaN or infinite loss in the stage's training log")
def check_stage1_model_loss_finite(stage1_model: dict) -> dg.AssetCheckResult:
    return _loss_check(stage1_model)


@dg.asset_check(asset=stage2_model, partitions_def=ARM_SEED, description="no NaN or infinite loss in the stage's training log")
def check_stage2_model_loss_finite(stage2_model: dict) -> dg.AssetCheckResult:
    return _loss_check(stage2_model)


@dg.asset_check(asset=benchmark_scores, partitions_def=ARM_SEED, description="format accuracy is at least min_format_accuracy")
def check_benchmark_scores_format_accuracy(config: FormatCheckConfig, benchmark_scores: dict) -> dg.AssetCheckResult:
    accuracy = benchmark_scores["metrics"]["format_accuracy"]
    if accuracy is None:  # the plain arm writes no tags: there is no format to check
        return dg.AssetCheckResult(passed=True, description="n/a: untagged (plain) arm", metadata={
            "format_accuracy": "n/a", "min_format_accuracy": config.min_format_accuracy})
    return dg.AssetCheckResult(passed=accuracy >= config.min_format_accuracy, metadata={
        "format_accuracy": accuracy, "min_format_accuracy": config.min_format_accuracy,
    })


@dg.asset_check(asset=benchmark_scores, partitions_def=ARM_SEED,
                description="at most 5% of the answers were cut by the new-token cap (else accuracy is a floor)")
def check_benchmark_scores_length_cap(benchmark_scores: dict) -> dg.AssetCheckResult:
    from sftkey.evaluate import LENGTH_CAP_WARNING_SHARE

    share = benchmark_scores["metrics"]["length_cap_share"]
    return dg.AssetCheckResult(
        passed=share <= LENGTH_CAP_WARNING_SHARE, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(benchmark_scores.get("warnings", [])) or None,
        metadata={"length_cap_share": share, "max_share": LENGTH_CAP_WARNING_SHARE,
                  "max_new_tokens": benchmark_scores.get("max_new_tokens") or -1})


# The checks whose ERROR-severity failure bars promotion: partitioned ones count on the candidate's arm x seed.
GATED_CHECKS = [check_annotated_dataset_coverage, check_stage1_model_loss_finite, check_stage2_model_loss_finite,
                check_benchmark_scores_format_accuracy, check_benchmark_scores_length_cap]


def failed_checks(instance: dg.DagsterInstance, run_tags: dict, partition: str) -> list[str]:
    """The ERROR-severity checks that failed on the candidate: the latest evaluation of each gated check (within
    this pipeline run's Dagster runs when it has any), unpartitioned or on `partition`. WARN failures pass."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status

    from orchestration.pipeline import PIPELINE_RUN_TAG  # on every Dagster run of one `sftkey pipeline` run

    run_ids = None
    if run_tags.get(PIPELINE_RUN_TAG):
        runs = instance.get_runs(filters=dg.RunsFilter(tags={PIPELINE_RUN_TAG: run_tags[PIPELINE_RUN_TAG]}))
        run_ids = {run.run_id for run in runs}
    failed = []
    for check in GATED_CHECKS:
        for key in check.check_keys:
            history = instance.event_log_storage.get_asset_check_execution_history(
                key, limit=100, status={Status.SUCCEEDED, Status.FAILED})
            for record in history:  # newest first
                evaluation = record.event.asset_check_evaluation if record.event else None
                if (evaluation is None or (run_ids is not None and record.run_id not in run_ids)
                        or evaluation.partition not in (None, partition)):
                    continue
                if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                    failed.append(key.name + (f" [{partition}]" if evaluation.partition else ""))
                break
    return failed


@dg.asset_check(asset=registered_model, blocking=True,
                description="the candidate passed every check and beats the champion on the same benchmark by the "
                            "margin with a significant paired test, or reaches min_accuracy when there is no "
                            "champion; records the decision and evidence as version tags")
def check_registered_model_promotion_gate(context: dg.AssetCheckExecutionContext, config: GateCheckConfig,
                                          registered_model: dict, tracking: MlflowResource) -> dg.AssetCheckResult:
    from orchestration.registry import evaluate_gate

    partition = f"{registered_model['arm']}|{registered_model['seed']}"
    failed = failed_checks(context.instance, dict(context.run.tags), partition)
    decision = evaluate_gate(tracking.client(), registered_model["name"], registered_model["version"],
                             config.margin_points, config.alpha, config.min_accuracy, failed)
    return dg.AssetCheckResult(passed=decision.promote, description=decision.reason, metadata={
        "decision": "promote" if decision.promote else "refuse", "reason": decision.reason,
        "candidate_accuracy": decision.candidate_accuracy,
        "champion_accuracy": decision.champion_accuracy if decision.champion_accuracy is not None else float("nan"),
        "champion_version": decision.champion_version or "none",
        "p_value": decision.p_value if decision.p_value is not None else float("nan"),
        "margin_points": decision.margin_points, "min_accuracy": decision.min_accuracy,
        "failed_checks": ", ".join(decision.failed_checks) or "none",
    })


ALL_CHECKS = [check_annotated_dataset_coverage, check_stage1_model_loss_finite, check_stage2_model_loss_finite,
              check_benchmark_scores_format_accuracy, check_benchmark_scores_length_cap,
              check_registered_model_promotion_gate]
