"""`sftkey pipeline`: run the whole asset graph (data, every arm x seed, comparison, registry) in this process.

Lives in `orchestration/` (not `sftkey/commands/`) so that the library never imports dagster or mlflow; the
`sftkey` CLI imports this module only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "configs/pipeline_demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"pipeline YAML (default {DEFAULT_CONFIG}: SmolLM2-135M-Instruct as a dequantised Q4_1 GGUF, a GSM8K subset, SFT-Tag vs SFTKey-Tag)")
    parser.add_argument("--work-dir", default=None, help="override work_dir: Dagster home, MLflow store, DVC repo, outputs")
    parser.add_argument("--verbose", action="store_true", help="show Dagster's per-step event log")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 5x faster on small CPUs; only effective before torch starts
    from orchestration.config import load_pipeline_config
    from orchestration.pipeline import PipelineFailed, run_pipeline, summary_lines
    from orchestration.tracking import TrackingUnavailable
    from sftkey.data import DataError
    from sftkey.train.config import ConfigError

    try:
        config = load_pipeline_config(args.config, {"work_dir": args.work_dir} if args.work_dir else None)
    except (ConfigError, DataError) as e:
        print(f"sftkey pipeline: {e}", file=sys.stderr)
        return 2
    print(f"sftkey pipeline: {args.config} -> {config.work_dir}", flush=True)
    try:
        result = run_pipeline(config, echo=lambda line: print(line, flush=True),
                              log_level="INFO" if args.verbose else "ERROR")
    except TrackingUnavailable as e:
        print(f"sftkey pipeline: {e}", file=sys.stderr)
        return 2
    except PipelineFailed as e:
        print(f"sftkey pipeline: failed: {e}", file=sys.stderr)
        return 1
    ui = f"sftkey ui --config {args.config}" + (f" --work-dir {args.work_dir}" if args.work_dir else "")
    print("\n".join(summary_lines(config, result, ui)))
    return 0
