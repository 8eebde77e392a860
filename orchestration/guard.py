"""`python -m orchestration.guard PARENT_PID -- COMMAND...`: run a server so that it dies with the process that
started it, however that process ends (Ctrl-C, SIGTERM, kill -9).

The server runs in its own process group, and this guard takes the whole group down (SIGINT, then SIGKILL) when it
is asked to stop or when its parent dies: Linux tells it through PR_SET_PDEATHSIG (set before exec by
`parent_death_preexec`), elsewhere it polls its parent. A group, because both servers fork workers of their own
(`mlflow server` runs uvicorn, `dagster dev` a webserver and a daemon). Standard library only: it starts in
a fraction of a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_S = 0.5
STOP_TIMEOUT_S = 20.0


def parent_death_preexec(parent_pid: int):
    """A preexec_fn: this child gets SIGTERM when its parent dies (Linux; elsewhere the guard polls)."""

    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a child started from a script may inherit an ignored SIGINT
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Stop(Exception):
    pass


def _stop(signum, frame) -> None:
    raise Stop


def stop_group(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGINT to the group (the only signal `dagster dev` obeys), then SIGKILL to what is left of it."""
    for signum, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(process):
            time.sleep(0.1)
        if not _group_alive(process):
            return


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader if it exited
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def guard(parent_pid: int, command: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    process = None
    try:
        if os.getppid() != parent_pid:
            return 1
        process = subprocess.Popen(command, start_new_session=True)
        while process.poll() is None:
            if os.getppid() != parent_pid:  # no PR_SET_PDEATHSIG here (not Linux): the parent is gone
                raise Stop
            time.sleep(POLL_S)
        return process.returncode
    except Stop:
        return 0
    finally:
        if process is not None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
            stop_group(process)


def guarded(command: list[str]) -> list[str]:
    """`command` under a guard whose parent is this process (start it with `parent_death_preexec(os.getpid())`)."""
    return [sys.executable, "-m", "orchestration.guard", str(os.getpid()), "--", *command]


if __name__ == "__main__":
    separator = sys.argv.index("--")
    sys.exit(guard(int(sys.argv[1]), sys.argv[separator + 1:]))
