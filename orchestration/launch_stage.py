"""Entry point of one launched training stage (orchestration/launchers.py: `accelerate launch`, torchrun, a pod
running the Dockerfile's ENTRYPOINT).

Every process trains (data parallel); the main one reports progress lines and the finished checkpoint to Dagster
through Pipes, and each step's metrics to the MLflow run named by MLFLOW_TRACKING_URI and MLFLOW_RUN_ID (set by
orchestration.telemetry.stage_telemetry) as it ends.

    accelerate launch --num_processes N -m orchestration.launch_stage --config C --arm A --seed S \\
        --stage-index K --init MODEL --prepared FOLDER
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.launch_stage", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="resolved `sftkey train` config (its output_dir is the store folder)")
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--stage-index", type=int, required=True)
    parser.add_argument("--init", required=True, help="model name or checkpoint folder the stage starts from")
    parser.add_argument("--prepared", required=True, help="prepared data set folder (tokenized_dataset)")
    args = parser.parse_args(argv)

    from sftkey.prepare import read_prepared
    from sftkey.train.config import load_config
    from sftkey.train.trainer import run_stage

    main_process = int(os.environ.get("RANK", "0")) == 0
    config = load_config(args.config)
    run = lambda tracker=None: run_stage(config, args.arm, args.seed, args.stage_index, args.init,  # noqa: E731
                                         tracker=tracker, resume=True, prepared=read_prepared(Path(args.prepared)))
    if not main_process:
        run()
        return 0
    from dagster_pipes import open_dagster_pipes

    from orchestration.telemetry import tracker_from_env

    with open_dagster_pipes() as pipes:
        pipes.log.info(f"stage {args.stage_index} of {args.arm} seed {args.seed} on {os.environ.get('WORLD_SIZE', '1')} processes")
        final = run(tracker_from_env(say=pipes.log.info, warn=pipes.log.warning))
        pipes.report_custom_message({"checkpoint": str(final)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
