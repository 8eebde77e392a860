"""`sftkey regress`: run the pipeline on a fixed small config and fail (exit 1), with a report, when a metric
falls below the baseline: the committed baseline file, and the registry's champion when there is one.

    sftkey regress --config configs/regress_cpu.yaml                 # CI (.ci/run)
    sftkey regress --config configs/regress_cpu.yaml --write-baseline benchmarks/baseline_regress.json
"""

from __future__ import annotations

import argparse
import os
import sys

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
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from orchestration.config import load_pipeline_config, resources
    from orchestration.pipeline import PipelineFailed, run_pipeline
    from orchestration.regress import (
        BaselineError, champion_metrics, checks_against, measured_metrics, read_baseline, report_lines, write_baseline,
    )
    from orchestration.tracking import TrackingUnavailable
    from sftkey.data import DataError
    from sftkey.train.config import ConfigError

    try:
        config = load_pipeline_config(args.config, {"work_dir": args.work_dir} if args.work_dir else None)
        baseline = None if args.write_baseline else read_baseline(args.baseline)
        tracking = resources(config)["tracking"]
        champion = None if args.no_champion or args.write_baseline else champion_metrics(
            tracking.client(), config.sections.promotion.model_name)  # read before this run may promote
        result = run_pipeline(config, echo=lambda line: print(line, flush=True))
    except (ConfigError, DataError, BaselineError, TrackingUnavailable) as e:
        print(f"sftkey regress: {e}", file=sys.stderr)
        return 2
    except PipelineFailed as e:
        print(f"sftkey regress: the pipeline failed: {e}", file=sys.stderr)
        return 1
    measured = measured_metrics(result)
    if args.write_baseline:
        tolerance = read_baseline(args.write_baseline)["tolerance"] if os.path.exists(args.write_baseline) else {}
        path = write_baseline(args.write_baseline, config, measured, tolerance)
        print(f"baseline written to {path}: {measured}")
        return 0
    try:
        checks = checks_against(f"file {args.baseline}", baseline["metrics"], measured, baseline.get("tolerance", {}))
        if champion is not None:
            source, metrics = champion
            checks += checks_against(source, metrics, measured, baseline.get("tolerance", {}))
    except BaselineError as e:
        print(f"sftkey regress: {e}", file=sys.stderr)
        return 2
    print("\n".join(["", f"Regression report ({args.config}, pipeline run {result.pipeline_run}):", "",
                     *report_lines(checks)]))
    return 0 if all(c.passed for c in checks) else 1
