"""Several arm x seed runs at once on a CPU: one single-thread `sftkey train` process per core.

On the 2-core VM of this project two 1-thread processes did 1.9x the work of one, a 2-thread process 1.3-1.6x
(benchmarks/RESULTS.md, "CPU parallelism"), so independent runs go to processes; the cores left over (more cores
than runs) go to each run's work threads (sftkey.cpu_threads). A run whose first stage is another run's
(SFTKey-Tag's stage 1 is SFT-Tag's) starts after that run and reuses its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from sftkey.cpu_threads import THREADS_ENV, cpu_cores, memory_bytes

# A 135M model's training step on CPU peaks at 3-7 GB resident (benchmarks/train_throughput.py): processes at once
# are bounded by memory as well as by cores.
CPU_RUN_MEMORY_GB = 6
POLL_S = 0.2

Cell = tuple[str, int]  # (arm, seed)


def memory_gb() -> int:
    return memory_bytes() // 2**30 or CPU_RUN_MEMORY_GB  # unknown: as if there were room for one run


PROCESSES_ENV = "SFTKEY_CPU_PROCESSES"  # at most this many (a shared machine, or a test suite that wants one)


def cpu_processes(work: int) -> int:
    """Single-thread processes to run at once on this CPU: one per core, no more than the units of `work` that can
    run side by side, than memory holds, and than $SFTKEY_CPU_PROCESSES when set."""
    limit = min(cpu_cores(), work, memory_gb() // CPU_RUN_MEMORY_GB)
    cap = os.environ.get(PROCESSES_ENV, "").strip()
    if cap.isdigit():
        limit = min(limit, int(cap))
    return max(1, limit)


def first_stage_owners(training, arms: list[str], seeds: list[int]) -> dict[Cell, Cell]:
    """(arm, seed) -> the earlier run (arms in the order given, per seed) whose first stage trains the same weights
    (equal stage views); that run's stage 1 is reused instead of trained beside it."""
    from sftkey.train.config import stage_view, training_view

    owners, first = {}, {}
    for seed in seeds:
        for arm in arms:
            view = json.dumps(stage_view(training_view(training, arm, seed), 0), sort_keys=True)
            if view in first:
                owners[(arm, seed)] = first[view]
            else:
                first[view] = (arm, seed)
    return owners


def run_in_processes(command: Callable[[Cell], list[str]], cells: list[Cell], owners: dict[Cell, Cell], jobs: int,
                     log_of: Callable[[Cell], Path], echo: Callable[[str], None]) -> int:
    """Run `command(cell)` for every cell, `jobs` at once, each after its owner; returns 0 or the first failure's exit
    code. A failure starts no further runs (those running finish); SIGINT/SIGTERM reach every child, and the return
    is 130/143 once they have ended (each marks its own run.json)."""
    owners = {cell: owner for cell, owner in owners.items() if owner in cells}  # an owner left out is not waited for
    waiting, running, done, failed = list(cells), {}, set(), None
    # one torch thread each; the cores left over go to each run's work threads (sftkey.cpu_threads)
    env = os.environ | {"OMP_NUM_THREADS": "1", THREADS_ENV: str(max(1, cpu_cores() // jobs))}
    previous = signal.signal(signal.SIGTERM, _raise_terminate)
    try:
        while waiting or running:
            for cell in [c for c in waiting if failed is None and len(running) < jobs and owners.get(c, c) in done | {c}]:
                if len(running) >= jobs:
                    break
                waiting.remove(cell)
                log = log_of(cell)
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w", encoding="utf-8") as out:  # own session: a terminal's Ctrl-C reaches the
                    # children once, through this process, not twice (a second SIGINT could cut their run.json update)
                    running[cell] = subprocess.Popen(command(cell), env=env, stdout=out, stderr=subprocess.STDOUT,
                                                     start_new_session=True)
                echo(f"{cell[0]} seed {cell[1]}: started (pid {running[cell].pid}, log {log})")
            if failed is not None and not running:
                break
            time.sleep(POLL_S)
            for cell, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[cell]
                if proc.returncode == 0:
                    done.add(cell)
                    echo(_last_line(log_of(cell)))
                else:
                    failed = failed if failed is not None else proc.returncode
                    echo(f"{cell[0]} seed {cell[1]}: failed (exit {proc.returncode}): {_last_line(log_of(cell))}")
            if failed is not None and waiting:
                echo(f"not started after the failure: {', '.join(f'{a} seed {s}' for a, s in waiting)}")
                waiting.clear()
    except (KeyboardInterrupt, _Terminate) as stop:
        code = 143 if isinstance(stop, _Terminate) else 130
        for proc in running.values():
            proc.send_signal(signal.SIGTERM if code == 143 else signal.SIGINT)
        for cell, proc in running.items():
            proc.wait()
            echo(_last_line(log_of(cell)))
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed or 0


class _Terminate(Exception):
    pass


def _raise_terminate(signum, frame) -> None:
    raise _Terminate()


def _last_line(log: Path) -> str:
    """The run's own last line (its result or its one-line error), without progress-bar redraws."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return f"(no log at {log})"
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else f"(empty log {log})"


def child_command(config: str, overrides: list[str], cell: Cell, passthrough: list[str]) -> list[str]:
    """This `sftkey train` invocation narrowed to one run, in one process."""
    sets = [item for override in overrides for item in ("--set", override)]
    return [sys.executable, "-m", "sftkey.cli", "train", "--config", config, *sets, "--arm", cell[0],
            "--seed", str(cell[1]), "--jobs", "1", *passthrough]
