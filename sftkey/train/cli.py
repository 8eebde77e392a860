"""`sftkey train --config configs/X.yaml [--set key=value ...] [--resume] [--arm NAME] [--seed N] [--prepared DIR]
[--jobs N] [--tracking-uri URI [--experiment NAME]]`.

Runs every arm x seed of the config (or the chosen ones), each in `{output_dir}/{arm}/seed{seed}/`, with a progress
bar. On a CPU, runs that do not wait for another's first stage go to single-thread processes, one per core
(sftkey.train.parallel_runs; `--jobs 1` keeps them in this process). Under `accelerate launch` or `torchrun` every process runs this same command (data parallel). With a tracking
URI (or MLFLOW_TRACKING_URI) each arm x seed is also one MLflow run with live step metrics, logged by the main
process through orchestration.telemetry (imported only then: the library never imports mlflow).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

from sftkey.errors import UserError

DEFAULT_EXPERIMENT = "sftkey"
FINAL_CHECKPOINT_TAG = "sftkey.final_checkpoint"  # on the arm x seed's MLflow run


class TrackingSetupError(UserError):
    """--tracking-uri was given but MLflow logging cannot be set up here."""


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
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="arm x seed runs at once, each a single-thread process (default: on a CPU one per core, "
                             "no more than the runs that can start on their own; 1 on a GPU and under accelerate)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), metavar="URI",
                        help="also log to MLflow: one run per arm x seed with params, live step metrics and the "
                             "final checkpoint (default: $MLFLOW_TRACKING_URI; unset: no MLflow)")
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                        help="MLflow experiment of those runs "
                             f"(default: $MLFLOW_EXPERIMENT_NAME or {DEFAULT_EXPERIMENT})")


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
    _refuse_folders_in_training(config, arms, seeds)
    mlflow_runs = _mlflow_runs(args.tracking_uri, args.experiment)  # the store is checked before any training
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # only effective before torch starts its thread pool
    jobs = _jobs(args.jobs, config, arms, seeds)
    if jobs > 1:
        return _train_in_processes(args, config, arms, seeds, jobs)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    from sftkey.train.layout import run_folder
    from sftkey.train.trainer import Terminated, train_arm

    hf_logging.disable_progress_bar()  # our own bar shows the steps; weight loading needs none
    main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        for arm in arms:
            for seed in seeds:
                started = time.perf_counter()
                metrics = run_folder(config.output_dir, arm, seed).metrics
                try:  # user errors (bad data, a locked run folder, a NaN loss) reach the CLI's one line
                    with (mlflow_runs(arm, seed, metrics) if mlflow_runs else contextlib.nullcontext()) as tracker:
                        final = train_arm(config, arm, seed, tracker=tracker, resume=args.resume, prepared=prepared,
                                          progress=True)
                        if tracker is not None:
                            tracker.set_tags({FINAL_CHECKPOINT_TAG: str(final)})
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


def _refuse_folders_in_training(config, arms: list[str], seeds: list[int]) -> None:
    """A run folder another process trains is refused before the MLflow store is opened or a run made for it: that
    process may hold the sqlite store's lock, and the refusal must not wait for it or leave a stray run. Under a
    launcher only rank 0 asks: the other ranks may start after rank 0 took the folder."""
    from sftkey.train.layout import run_folder
    from sftkey.train.trainer import refuse_if_training

    if int(os.environ.get("RANK", "0")) != 0:
        return
    for arm in arms:
        for seed in seeds:
            refuse_if_training(run_folder(config.output_dir, arm, seed).root)


def _jobs(asked: int | None, config, arms: list[str], seeds: list[int]) -> int:
    from sftkey.config_file import ConfigError
    from sftkey.train.parallel_runs import cpu_processes, first_stage_owners

    if asked is not None:
        if asked < 1:
            raise ConfigError(f"--jobs {asked}: give 1 or more runs at once")
        return asked
    import torch

    if "RANK" in os.environ or torch.cuda.is_available():  # a launched process, or a GPU: one run at a time here
        return 1
    return cpu_processes(len(arms) * len(seeds) - len(first_stage_owners(config, arms, seeds)))


def _train_in_processes(args, config, arms: list[str], seeds: list[int], jobs: int) -> int:
    from pathlib import Path

    from sftkey.train.parallel_runs import child_command, first_stage_owners, run_in_processes

    cells = [(arm, seed) for seed in seeds for arm in arms]
    passthrough = ["--resume"] * args.resume + (["--prepared", args.prepared] if args.prepared else []) + (
        ["--tracking-uri", args.tracking_uri, "--experiment", args.experiment] if args.tracking_uri else [])
    logs = Path(config.output_dir) / "logs"
    print(f"sftkey train: {len(cells)} runs, {jobs} at once (single-thread processes; logs in {logs})", flush=True)
    code = run_in_processes(lambda cell: child_command(args.config, args.overrides, cell, passthrough), cells,
                            first_stage_owners(config, arms, seeds), jobs,
                            lambda cell: logs / f"{cell[0]}-seed{cell[1]}.log", lambda line: print(line, flush=True))
    if code in (130, 143):
        print(f"sftkey train: {'interrupted' if code == 130 else 'killed by SIGTERM'}; rerun with --resume to "
              "continue each run from its newest checkpoint", file=sys.stderr)
    elif code:
        print(f"sftkey train: a run failed (exit {code}); see its line above and its log", file=sys.stderr)
    return code


def _mlflow_runs(tracking_uri: str | None, experiment: str):
    """orchestration.telemetry.train_runs for the main process when a tracking URI is given, else None."""
    if not tracking_uri or int(os.environ.get("RANK", "0")) != 0:  # the main process reports for all
        return None
    try:
        from orchestration.telemetry import train_runs
    except ImportError as error:
        raise TrackingSetupError(
            "--tracking-uri: logging to MLflow needs mlflow and this project's orchestration package "
            f"({error}); install them with `pip install -e .` in the sftkey checkout, or drop --tracking-uri "
            "(and unset MLFLOW_TRACKING_URI)") from None
    return train_runs(tracking_uri, experiment)


def _raise_terminated(signum, frame) -> None:
    """SIGTERM becomes an exception in the main thread: the trainer's `finally` writes run.json before exit."""
    from sftkey.train.trainer import Terminated

    raise Terminated(signum)
