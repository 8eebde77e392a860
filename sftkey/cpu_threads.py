"""Work threads on a CPU: independent pieces of one job (the examples of a training step, the batches of a
generation run) each on a thread of its own with one torch thread, so every core computes.

torch releases the GIL inside its kernels, so two Python threads keep two cores busy. On this project's 2-vCPU
EPYC (SmolLM2-135M, fp32, idle machine) two pieces of a training step on two threads ran 1.60x one thread, two
generation batches 1.69x, where one process with two torch threads ran 1.57x / 1.30x idle and 0.24x under load
(benchmarks/RESULTS.md). Results never depend on the thread count: each piece is computed alone, the same way
on any number of threads, and combined in a fixed order by the caller.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

THREADS_ENV = "SFTKEY_CPU_THREADS"  # at most this many work threads (set for runs that share a CPU with others)

T = TypeVar("T")
R = TypeVar("R")


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask: a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_threads(setting: int | None = None) -> int:
    """Work threads: `setting` when given, else one per core this process may use, capped by $SFTKEY_CPU_THREADS."""
    if setting is not None:
        if setting < 1:
            raise ValueError(f"work threads must be >= 1, got {setting}")
        return setting
    limit = cpu_cores()
    cap = os.environ.get(THREADS_ENV, "").strip()
    if cap.isdigit():
        limit = min(limit, int(cap))
    return max(1, limit)


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op threads at 1 while work threads run ops: n threads x m torch threads would oversubscribe the
    cores (and OpenMP's spinning teams collapse under load). Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(work: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """work(item) for each item, up to `threads` at once, yielded in the items' order. At most `threads` results
    are held (memory of `threads` pieces); an exception is raised where its item's result would come, and no
    further piece starts."""
    if threads <= 1:
        yield from map(work, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with one_torch_thread(), ThreadPoolExecutor(threads, thread_name_prefix="sftkey-work") as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # a failure or an early stop: the pieces not started are dropped
                future.cancel()


def add_gradients(params: list, grads: tuple) -> None:
    """Accumulate one piece's gradients (torch.autograd.grad's) into .grad as backward() would: the first piece's
    set, the next ones added in place. Called in piece order, it gives backward()'s sums bit for bit."""
    for param, grad in zip(params, grads):
        if grad is None:  # not used by this piece
            continue
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)
