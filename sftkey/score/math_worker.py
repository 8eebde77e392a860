"""math-verify in a worker process: the scorer of math-expression answers (MATH-500).

Equal when the two strings are the same up to whitespace, else math-verify's `verify(parse(gold), parse(pred))`,
with bare LaTeX put in `$...$` so that its extractor finds it, run in a worker process that is killed after a
time limit (a timeout counts as not equal).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

MATH_VERIFY_TIMEOUT_S = 5.0  # a math-verify comparison slower than this counts as not equal (its own default)
_WORKER_START_TIMEOUT_S = 60.0  # importing math-verify in a fresh interpreter; not charged to the comparison
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|(?<!\\)\\[(\[]|\\boxed")  # `$`, `\(`, `\[` (not `\$`, `\\[`), `\boxed`


def match_math(pred: str, gold: str, timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> tuple[bool, str]:
    """The scorer of math answers. Reasons: `same text up to whitespace`, `equal (math-verify)`,
    `not equal (math-verify)`, `math-verify: could not parse prediction` (or `gold answer`), `math-verify timeout`."""
    # Same text is the same answer: no need to pay the worker's round trip (math-verify agrees on every
    # MATH-500 gold answer compared with itself).
    if pred.split() == gold.split():
        return True, "same text up to whitespace"
    return WORKER.compare(math_delimited(pred), math_delimited(gold), timeout_s)


class _MathVerifyWorker:
    """A child interpreter that runs math-verify, killed and replaced when one comparison takes too long.

    A process, not math-verify's own timeouts: those use `signal.alarm`, which works only in a main thread and
    cannot interrupt sympy inside one long C call (a big integer power such as 9^(9^9)); a process can be killed.
    It is started once and reused, so a comparison costs a pipe round trip, not an interpreter start.
    A process forked from the owner (a multiprocessing pool) starts its own: the pipe and reader thread are not its.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._owner_pid: int | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()

    def compare(self, pred: str, gold: str, timeout_s: float) -> tuple[bool, str]:
        with self._lock:
            if self._owner_pid != os.getpid():
                self._proc = None  # inherited through fork: the parent's worker, left to the parent
            if self._proc is None and not self._start():
                return False, "math-verify worker failed to start"
            try:
                self._proc.stdin.write(json.dumps([pred, gold]) + "\n")
                self._proc.stdin.flush()
                line = self._lines.get(timeout=timeout_s)
            except queue.Empty:
                self.close()
                return False, "math-verify timeout"
            except OSError:
                self.close()
                return False, "math-verify worker died"
            try:
                equal, reason = json.loads(line)
            except (TypeError, ValueError):  # None (the worker exited) or a line that is not an answer
                self.close()
                return False, "math-verify worker died"
            return bool(equal), str(reason)

    def _start(self) -> bool:
        package_parent = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from sftkey.score.math_worker import worker_main; worker_main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        except OSError:
            return False
        self._owner_pid = os.getpid()
        self._lines = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self._proc.stdout, self._lines), daemon=True).start()
        try:
            ready = self._lines.get(timeout=_WORKER_START_TIMEOUT_S)
        except queue.Empty:
            ready = None
        if ready is None or ready.strip() != "ready":
            self.close()
            return False
        return True

    def close(self) -> None:
        if self._proc is None or self._owner_pid != os.getpid():
            self._proc = None
            return
        self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass  # the pipe is already broken; nothing left to release
        self._proc = None


def _pump_lines(stream: IO[str], lines: queue.Queue) -> None:
    """Forward the worker's output lines to `lines`; None marks its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


WORKER = _MathVerifyWorker()
atexit.register(WORKER.close)


def worker_main() -> None:
    """The worker's loop: read `[pred, gold]` JSON lines, answer `[equal, reason]` lines."""
    answers = os.fdopen(os.dup(1), "w")  # the pipe to the parent, kept for answers only
    os.dup2(2, 1)  # anything a library prints (antlr warns on stdout) goes to stderr, not into the answers
    _math_verify("$1$", "$1$")  # imports and loads the LaTeX grammar before `ready`: no comparison pays for it
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        pred, gold = json.loads(line)
        print(json.dumps(_math_verify(pred, gold)), file=answers, flush=True)


def _math_verify(pred: str, gold: str) -> list:
    """[equal, reason]: math-verify's `verify(parse(gold), parse(pred))`; runs in the worker.

    Its timeouts are off (None): they rely on signals, and the parent's kill is the time limit here.
    """
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold, parsing_timeout=None)
        if not gold_parsed:
            return [False, "math-verify: could not parse gold answer"]
        pred_parsed = parse(pred, parsing_timeout=None)
        if not pred_parsed:
            return [False, "math-verify: could not parse prediction"]
        equal = verify(gold_parsed, pred_parsed, timeout_seconds=None)
    except Exception as error:  # sympy raises many types on odd input; any of them means "cannot tell"
        return [False, f"math-verify error: {type(error).__name__}"]
    return [True, "equal (math-verify)"] if equal else [False, "not equal (math-verify)"]


def math_delimited(answer: str) -> str:
    """`answer` inside `$...$`, unless it already has math delimiters (`$`, `\\(`, `\\[`) or a `\\boxed`.

    math-verify's LaTeX extractor reads only delimited LaTeX: bare, `\\{1,2\\}` is not found and `\\log_2 8`
    is read as the number 8.
    """
    return answer if _MATH_DELIMITER.search(answer) else f"${answer}$"
