"""What checking MATH answers with math-verify costs: the first comparison, then 500 of each kind.

Reads the MATH-500 gold answers (../shared/data/math500/test.jsonl, field `answer`) and times, in this order:
the first comparison (starting the worker and importing math-verify), each gold answer against itself through
`answers_match` (the same-text fast path) and through the worker (math-verify itself), and each gold answer
against a perturbed copy (its last digit changed, else `+1` appended). Takes no arguments; prints the figures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/math_answer_check.py
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when it is not installed

from sftkey import score  # noqa: E402
from sftkey.score import math_worker  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500" / "test.jsonl"
DATASET = "math500"


def load_answers(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


def perturbed(answer: str) -> str:
    """`answer` with its last digit changed (9 -> 0, else +1); `answer+1` when it has no digit."""
    digits = list(re.finditer(r"\d", answer))
    if not digits:
        return answer + "+1"
    at = digits[-1].start()
    return answer[:at] + str((int(answer[at]) + 1) % 10) + answer[at + 1 :]


def timed(label: str, pairs: list[tuple[str, str]], compare) -> None:
    """Run `compare(pred, gold)` on every pair; print the count judged equal and the time per comparison."""
    seconds, reasons = [], {}
    for pred, gold in pairs:
        start = time.perf_counter()
        equal, reason = compare(pred, gold)
        seconds.append(time.perf_counter() - start)
        reasons[reason] = reasons.get(reason, 0) + 1
    mean_ms, median_ms, max_ms = (1e3 * f(seconds) for f in (statistics.mean, statistics.median, max))
    print(
        f"{label}: {len(pairs)} comparisons in {sum(seconds):.2f} s; per comparison mean {mean_ms:.1f} ms,"
        f" median {median_ms:.1f} ms, max {max_ms:.0f} ms; reasons {reasons}"
    )


def through_worker(pred: str, gold: str) -> tuple[bool, str]:
    """math-verify's verdict without the same-text fast path."""
    return math_worker.WORKER.compare(math_worker.math_delimited(pred), math_worker.math_delimited(gold),
                                     math_worker.MATH_VERIFY_TIMEOUT_S)


def main() -> None:
    answers = load_answers(DATA)
    start = time.perf_counter()
    first = score.answers_match("0.5", "\\frac{1}{2}", DATASET)
    elapsed = time.perf_counter() - start
    print(f"first comparison (worker start, math-verify import, grammar load): {elapsed:.2f} s -> {first}")
    timed("gold vs itself, answers_match", [(a, a) for a in answers], lambda p, g: score.answers_match(p, g, DATASET))
    timed("gold vs itself, math-verify", [(a, a) for a in answers], through_worker)
    timed("gold vs perturbed, answers_match", [(perturbed(a), a) for a in answers],
          lambda p, g: score.answers_match(p, g, DATASET))


if __name__ == "__main__":
    main()
