"""Entry point of one training stage under `accelerate launch` (ComputeResource with num_processes > 1).

Every process trains (data parallel); the main one reports the finished checkpoint to Dagster through Pipes.

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
    run = lambda: run_stage(config, args.arm, args.seed, args.stage_index, args.init, resume=True,  # noqa: E731
                            prepared=read_prepared(Path(args.prepared)))
    if not main_process:
        run()
        return 0
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.log.info(f"stage {args.stage_index} of {args.arm} seed {args.seed} on {os.environ.get('WORLD_SIZE', '1')} processes")
        final = run()
        pipes.report_custom_message({"checkpoint": str(final)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
