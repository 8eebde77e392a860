"""Which devices a running cell step gets: a Dagster pool per device kind bounds how many cells run at once, and a
lease (one file lock per device) picks which devices a step uses, so 21 cells on 8 GPUs keep 8 GPUs busy and no
two steps share one.

Dagster's pools count steps, not devices, and do not say which slot a step holds; the lease adds that. A stage on
`num_processes` devices takes that many leases, and the pool's limit is the device count over `num_processes`.
The locks live on the store's filesystem, one set per host (devices are per machine).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

POOL_PREFIX = "sftkey"
POLL_S = 0.5  # how often a step waiting for a device tries again (the pool keeps the wait rare)


def device_kind(device: str) -> str:
    """The kind a `compute.device` setting resolves to here: cuda or cpu."""
    if device != "auto":
        return device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pool_name(kind: str) -> str:
    """The Dagster pool of a device kind: every step that trains or generates on it claims one slot."""
    return f"{POOL_PREFIX}_{kind}"


def device_count(kind: str) -> int:
    if kind != "cuda":
        return 1
    import torch

    return torch.cuda.device_count()


def pool_limit(kind: str, num_processes: int, concurrency: int | None, independent_cells: int = 1) -> int:
    """Cells at once: `concurrency` when set; else one per group of `num_processes` GPUs (at least 1); on CPU one
    single-thread process per core, at most one per cell that starts on its own (not waiting for another's first
    stage): sftkey.train.parallel_runs.cpu_processes. On 2 cores two 1-thread processes did 1.9x the work of one, a
    2-thread process 1.3-1.6x idle and 0.24x under load. The demo (one independent cell) stays in process: running
    its second cell beside the first after the shared stage 1 cost more in step processes than it saved (321 s vs
    231 s, benchmarks/RESULTS.md)."""
    if concurrency is not None:
        return concurrency
    if kind == "cuda":
        return max(1, device_count(kind) // num_processes)
    from sftkey.train.parallel_runs import cpu_processes

    return cpu_processes(independent_cells)


@contextlib.contextmanager
def lease(store_root: str | Path, kind: str, count: int, timeout_s: float | None = None) -> Iterator[list[int]]:
    """`count` device indices of this host held for the block (waits while all are taken). On CPU there is one
    device and nothing to hold: yields [] at once."""
    if kind != "cuda" or count < 1:
        yield []
        return
    from filelock import FileLock, Timeout

    total = device_count(kind)
    if count > total:
        raise RuntimeError(f"a stage needs {count} {kind} devices and this host has {total}: lower "
                           "compute.num_processes or run on a larger machine")
    folder = Path(store_root) / "devices" / socket.gethostname()
    folder.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(folder / f"{kind}{i}.lock")) for i in range(total)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    held: list[int] = []
    try:
        while True:
            for index, lock in enumerate(locks):
                with contextlib.suppress(Timeout):
                    lock.acquire(timeout=0)
                    held.append(index)
                    if len(held) == count:
                        break
            if len(held) == count:
                break
            for index in held:  # all or none: two stages holding half each would wait on each other forever
                locks[index].release()
            held = []
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no {count} free {kind} devices within {timeout_s} s")
            time.sleep(POLL_S)
        yield held
    finally:
        for index in held:
            locks[index].release()


def visible_devices(indices: list[int]) -> dict[str, str]:
    """The environment that gives a launched process these devices (and only these)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in indices)} if indices else {}


def use_devices(indices: list[int]) -> None:
    """Give this step the leased devices: CUDA_VISIBLE_DEVICES for what it launches (and for this process when
    CUDA has not started yet: it reads the variable once), and the first one as the current device when it has."""
    if not indices:
        return
    os.environ.update(visible_devices(indices))
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.set_device(indices[0])


@contextlib.contextmanager
def step_devices(store_root: str | Path, device: str, num_processes: int) -> Iterator[list[int]]:
    """What a cell step runs inside: its devices leased and made visible (nothing to do on CPU)."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    with lease(store_root, device_kind(device), num_processes) as indices:
        use_devices(indices)
        try:
            yield indices
        finally:
            if indices:  # the in-process executor runs the next step in this same process
                os.environ.pop("CUDA_VISIBLE_DEVICES", None) if previous is None else os.environ.update(
                    CUDA_VISIBLE_DEVICES=previous)
