"""`sftkey regress`: run the pipeline on a fixed small config and fail (exit 1), with a report, when a metric
falls below the baseline: the committed baseline file, and the registry's champion when there is one.

    sftkey regress --config configs/regress_cpu.yaml                 # CI (.ci/run)
    sftkey regress --config configs/regress_cpu.yaml --write-baseline benchmarks/baseline_regress.json
"""

from __future__ import annotations

import argparse
import os

DEFAULT_CONFIG = "configs/regress_cpu.yaml"
DEFAULT_BASELINE = "benchmarks/baseline_regress.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"committed baseline file (default {DEFAULT_BASELINE})")
    parser.add_argument("--work-dir", default=None, help="override the config's work_dir")
    parser.add_argument("--no-champion", action="store_true", help="compare with the baseline file only, not the registry's champion")
    parser.add_argument("--write-baseline", metavar="PATH", default=None,
                        help="record this run's metrics as the baseline at PATH instead of checking (tolerances kept)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every metric holds, 1 (with the table) when one regressed; a baseline that cannot fail, a bad
    config or a failed pipeline raise a UserError, which `sftkey` prints as one line."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from orchestration.config import load_pipeline_config, resources
    from orchestration.pipeline import run_pipeline
    from orchestration.regress import (
        CHAMPION_FIX, champion_metrics, checked_tolerance, checks_against, measured_metrics, read_baseline,
        read_tolerance, regressible, report_lines, require_every_arm, write_baseline,
    )

    config = load_pipeline_config(args.config, {"work_dir": args.work_dir} if args.work_dir else None)
    # Everything that can be refused is read before training: the baseline, the tolerances kept, the champion.
    baseline = None if args.write_baseline else read_baseline(args.baseline)
    kept = read_tolerance(args.write_baseline) if args.write_baseline and os.path.exists(args.write_baseline) else {}
    require_every_arm(f"file {args.baseline}", baseline["metrics"] if baseline else {}, config.arms)
    tracking = resources(config)["tracking"]
    champion = None if args.no_champion or args.write_baseline else champion_metrics(
        tracking.client(), config.sections.promotion.model_name)  # read before this run may promote
    result = run_pipeline(config, echo=lambda line: print(line, flush=True))
    measured = measured_metrics(result)
    if args.write_baseline:
        path = write_baseline(args.write_baseline, config, measured, kept)
        print(f"baseline written to {path}: {measured}")
        return 0
    tolerance = baseline.get("tolerance") or {}
    checks = checks_against(f"file {args.baseline}", baseline["metrics"], measured, tolerance)
    notes = []
    if champion is not None:
        source, metrics = champion
        metrics, skipped = regressible(metrics, checked_tolerance(source, tolerance, CHAMPION_FIX))
        if skipped:
            notes.append(f"Not checked against {source} (they cannot regress): {'; '.join(skipped)}.")
        if metrics:
            checks += checks_against(source, metrics, measured, tolerance, CHAMPION_FIX)
    print("\n".join(["", f"Regression report ({args.config}, pipeline run {result.pipeline_run}):", "",
                     *notes, *report_lines(checks)]))
    return 0 if all(c.passed for c in checks) else 1
