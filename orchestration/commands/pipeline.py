"""`sftkey pipeline`: run the whole asset graph (data, every arm x seed, comparison, registry) in this process.

Lives in `orchestration/` (not `sftkey/commands/`) so that the library never imports dagster or mlflow; the
`sftkey` CLI imports this module only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "configs/pipeline_demo.yaml"
QUIET = "CRITICAL"  # a failed step is one line (its root cause); its trace stays in the Dagster run and --verbose


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"pipeline YAML (default {DEFAULT_CONFIG}: SmolLM2-135M-Instruct as a dequantised Q4_1 GGUF, an SVAMP subset, SFT-Tag vs SFTKey-Tag)")
    parser.add_argument("--work-dir", default=None, help="override work_dir: Dagster home, MLflow store, DVC repo, outputs")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set compute.concurrency=2 --set training.data.limit=16")
    parser.add_argument("--verbose", action="store_true", help="show Dagster's per-step event log")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 5x faster on small CPUs; only effective before torch starts
    from orchestration.config import load_pipeline_config
    from orchestration.pipeline import PipelineInterrupted, run_pipeline, summary_lines

    # Bad configs, an unusable tracking store and a failed step are UserErrors: the CLI prints their one line.
    config = load_pipeline_config(args.config, {"work_dir": args.work_dir} if args.work_dir else None, args.sets)
    print(f"sftkey pipeline: {args.config} -> {config.work_dir}", flush=True)
    try:
        result = run_pipeline(config, echo=lambda line: print(line, flush=True),
                              log_level="INFO" if args.verbose else QUIET)
    except PipelineInterrupted as interrupted:  # its runs are already marked killed
        print(f"sftkey pipeline: error: {interrupted}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Exit now: a signal can land inside a library starting a thread pool (MLflow, Dagster) and leave a worker
        # that nothing will ever wake, which would hold a normal interpreter exit forever.
        os._exit(interrupted.exit_code)
    ui = f"sftkey ui --config {args.config}" + (f" --work-dir {args.work_dir}" if args.work_dir else "")
    print("\n".join(summary_lines(config, result, ui)), flush=True)
    return verdict(result)


def verdict(result) -> int:
    """0 when every check passed and the candidate is champion; else 1, with one line saying why (printed last)."""
    if not result.promoted:
        print(f"sftkey pipeline: promotion refused: {result.promotion_reason}", file=sys.stderr)
        return 1
    if result.failed_checks:
        print(f"sftkey pipeline: checks failed: {', '.join(result.failed_checks)}", file=sys.stderr)
        return 1
    return 0
