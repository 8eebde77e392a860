"""`sftkey ui`: the Dagster UI and the MLflow UI on 127.0.0.1 (ports 3000 and 5000), stopped with Ctrl-C.

Both read the stores of a pipeline config's work_dir, so what `sftkey pipeline` ran shows up there.
"""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/pipeline_demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML whose stores are shown (default {DEFAULT_CONFIG})")
    parser.add_argument("--work-dir", default=None, help="override the config's work_dir")
    parser.add_argument("--dagster-port", type=int, default=3000, help="Dagster UI port (default 3000)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default 5000; with "
                        "tracking.server_backend_store_uri, the port of tracking.tracking_uri, where the pipeline looks)")


def run(args: argparse.Namespace) -> int:
    from orchestration.config import load_pipeline_config
    from orchestration.ui import serve

    config = load_pipeline_config(args.config, {"work_dir": args.work_dir} if args.work_dir else None)
    # a server that exits or does not answer while starting is a UserError: the `sftkey` CLI prints its one line
    return serve(config, args.dagster_port, args.mlflow_port, echo=lambda line: print(line, flush=True))
