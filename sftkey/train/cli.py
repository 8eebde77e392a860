"""`sftkey train --config configs/X.yaml [--set key=value ...] [--resume] [--arm NAME] [--seed N] [--prepared DIR]`.

Runs every arm x seed of the config (or the chosen ones), each in `{output_dir}/{arm}/seed{seed}/`, with a progress
bar. Under `accelerate launch` or `torchrun` every process runs this same command (data parallel).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 --set arms.sft_tag.stages.0.epochs=1")
    parser.add_argument("--resume", action="store_true",
                        help="continue each run from its newest complete checkpoint (finished runs are kept)")
    parser.add_argument("--arm", action="append", default=None, help="run only this arm (repeatable)")
    parser.add_argument("--seed", action="append", type=int, default=None, help="run only this seed (repeatable)")
    parser.add_argument("--prepared", default=None, metavar="DIR",
                        help="train on a folder written by `sftkey prepare --out DIR` instead of preparing the "
                             "config's data again (its `data` section is then not read)")


def run(args: argparse.Namespace) -> int:
    from sftkey.config_file import ConfigError
    from sftkey.train.config import load_config

    config = load_config(args.config, args.overrides)  # a ConfigError is printed by the CLI as one line
    arms = args.arm or list(config.arms)
    seeds = args.seed if args.seed is not None else config.seeds
    for arm in arms:
        if arm not in config.arms:
            raise ConfigError(f"--arm {arm}: no such arm in {args.config}; arms: {', '.join(config.arms)}")
    prepared = None
    if args.prepared is not None:
        from sftkey.prepare import read_prepared

        prepared = read_prepared(args.prepared)  # a DataError names the folder and how to write it
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # only effective before torch starts its thread pool
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    from sftkey.train.trainer import Terminated, train_arm

    hf_logging.disable_progress_bar()  # our own bar shows the steps; weight loading needs none
    main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        for arm in arms:
            for seed in seeds:
                started = time.perf_counter()
                try:  # user errors (bad data, a locked run folder, a NaN loss) reach the CLI's one line
                    final = train_arm(config, arm, seed, resume=args.resume, prepared=prepared, progress=True)
                except (KeyboardInterrupt, Terminated) as e:  # run.json already says interrupted / killed
                    how = "interrupted" if isinstance(e, KeyboardInterrupt) else "killed by SIGTERM"
                    print(f"sftkey train: {arm} seed {seed}: {how}; rerun with --resume to continue from its newest "
                          "checkpoint", file=sys.stderr)
                    return 130 if isinstance(e, KeyboardInterrupt) else e.code
                print(f"{arm} seed {seed}: {final} ({time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_terminated(signum, frame) -> None:
    """SIGTERM becomes an exception in the main thread: the trainer's `finally` writes run.json before exit."""
    from sftkey.train.trainer import Terminated

    raise Terminated(signum)
