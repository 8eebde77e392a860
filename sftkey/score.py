"""Scoring one generated response against a gold answer, and summarising a list of scores.

Rules, in one place:
- format: `<Thinking> ... </Thinking> <Answer> ... </Answer>` and nothing else (whitespace around and between is
  fine); each of the four tags occurs exactly once. Block contents may be anything without a tag, even empty.
- strict answer (tagged arms): the content of the Answer block, used only when the output holds exactly one
  `<Answer>` and one `</Answer>`, in that order, with no Thinking tag inside. It does not require the rest of the
  format (a missing Thinking block or trailing text), so strict accuracy and format accuracy measure different
  things and the composite score does not count a format failure twice.
- strict answer (plain arm): the rest of the line after the last `####`.
- lenient answer: math data sets: the last `\\boxed{...}`, else the last number; others: the last number.
  lenient_correct = strict_correct or the lenient answer matches, so lenient accuracy >= strict accuracy.
- equivalence, math data sets (`MATH_DATASETS`): math-verify's verdict, `verify(parse(gold), parse(pred))`, with
  bare LaTeX put in `$...$` so that its extractor finds it, run in a worker process that is killed after a time
  limit (a timeout counts as not equal). Strings equal up to whitespace are equal without asking it.
- equivalence, other data sets: the same number when the gold answer is a number, else the same text; see
  `answers_match`.
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
import unicodedata
from fractions import Fraction
from pathlib import Path
from typing import IO, Sequence

from sftkey.format import ANSWER_CLOSE, ANSWER_OPEN, PLAIN_ANSWER_MARKER, THINK_CLOSE, THINK_OPEN

TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Data sets whose answers are LaTeX: checked with math-verify, and their lenient answer is the last `\boxed{}`.
MATH_DATASETS = frozenset({"math", "math500"})

MATH_VERIFY_TIMEOUT_S = 5.0  # a math-verify comparison slower than this counts as not equal (its own default)
_WORKER_START_TIMEOUT_S = 60.0  # importing math-verify in a fresh interpreter; not charged to the comparison

COMPOSITE_WEIGHTS = (0.7, 0.3)  # (strict accuracy, format accuracy): the paper's composite score
METRIC_NAMES = (
    "strict_accuracy",
    "lenient_accuracy",
    "format_accuracy",
    "composite",
    "mean_reasoning_chars",
    "length_cap_share",
    "n",
)

_TEMPLATE = re.compile(
    rf"\s*{re.escape(THINK_OPEN)}.*{re.escape(THINK_CLOSE)}\s*{re.escape(ANSWER_OPEN)}.*{re.escape(ANSWER_CLOSE)}\s*",
    re.DOTALL,
)

# A number inside free text: optional minus (not a subtraction), optional currency, thousands groups or digits,
# then a decimal part or a fraction, then an optional percent sign.
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)])-)?(?:\\?\$\s?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+|/\d+)?%?"
)
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)|[-+]?\d+/\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CURRENCY_PREFIX = re.compile(r"^([-+]?)\s*(?:\\\$|\$|€|£)\s*")
_UNIT_SUFFIX = re.compile(r"^(.*\d)\s*[A-Za-z]+\.?$")  # "18 dollars", "5cm": one word after a number
_LATEX_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|(?<!\\)\\[(\[]|\\boxed")  # `$`, `\(`, `\[` (not `\$`, `\\[`), `\boxed`


# ---- format and extraction ----


def check_format(output: str) -> bool:
    """True when `output` is exactly one Thinking block then one Answer block, with only whitespace around."""
    if not isinstance(output, str):
        return False
    return all(output.count(tag) == 1 for tag in TAGS) and _TEMPLATE.fullmatch(output) is not None


def extract_tagged_answer(output: str) -> str | None:
    """The stripped content of the single closed Answer block, else None.

    None when `<Answer>` or `</Answer>` is missing or repeated, when they are out of order, or when a Thinking
    tag sits inside the block. Text before or after the block is allowed here; `check_format` judges it.
    """
    if not isinstance(output, str) or output.count(ANSWER_OPEN) != 1 or output.count(ANSWER_CLOSE) != 1:
        return None
    start = output.index(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = output.index(ANSWER_CLOSE)
    if end < start:
        return None
    content = output[start:end]
    if THINK_OPEN in content or THINK_CLOSE in content:
        return None
    return content.strip()


def extract_plain_answer(output: str) -> str | None:
    """The rest of the line after the last `####` (the plain arm's answer line), else None."""
    if not isinstance(output, str):
        return None
    cut = output.rfind(PLAIN_ANSWER_MARKER)
    if cut < 0:
        return None
    return output[cut + len(PLAIN_ANSWER_MARKER) :].split("\n", 1)[0].strip()


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed; `\\boxed 5` too), else None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _matching_brace(text, i)
        return None if end is None else text[i + 1 : end].strip()
    bare = re.match(r"[^\s$]+", text[i:])  # `\boxed 5$`: the token after it
    return bare.group(0) if bare else None


def _matching_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at`, else None."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def last_number(text: str) -> str | None:
    """The last number in `text` as written (`-3.5`, `1,000`, `$18`, `3/4`, `20%`), else None."""
    matches = _NUMBER_IN_TEXT.findall(text)
    return matches[-1] if matches else None


def extract_lenient_answer(output: str, dataset: str) -> str | None:
    """What a forgiving reader takes as the answer.

    Math data sets: the last `\\boxed{}`, else the last number; other data sets: the last number.
    """
    if not isinstance(output, str):
        return None
    if _dataset_key(dataset) in MATH_DATASETS:
        boxed = last_boxed(output)
        if boxed is not None:
            return boxed
    return last_number(output)


def reasoning_text(output: str, tagged: bool) -> str:
    """The text before the answer (first `<Answer>`, or last `####` for plain), without Thinking tags.

    For a well-formatted tagged output this is exactly the Thinking block's content; without an answer marker it
    is the whole output (a generation cut by the length cap is all reasoning).
    """
    if not isinstance(output, str):
        return ""
    cut = output.find(ANSWER_OPEN) if tagged else output.rfind(PLAIN_ANSWER_MARKER)
    before = output if cut < 0 else output[:cut]
    return before.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


# ---- numbers ----


def parse_number(text: str, units: bool = False) -> Fraction | None:
    """`text` as an exact number, else None.

    Accepts a sign, a leading currency sign ($, \\$, €, £), thousands commas in valid groups of three (`1,000`),
    a decimal or `a/b` fraction, `\\frac{a}{b}` with integers, and a trailing `%` (dropped: `50%` = 50, because
    gold answers state percentages as the number before the sign). With `units`, one trailing word of letters is
    dropped (`18 dollars` = 18); callers use it only where the gold answer is a plain number.
    """
    text = _clean(text).rstrip(".").strip()
    if units:
        text = _UNIT_SUFFIX.sub(r"\1", text)
    text = re.sub(r"\s*\\?%$", "", text)
    text = _CURRENCY_PREFIX.sub(r"\1", text).strip()
    latex = _LATEX_FRACTION.fullmatch(text)
    if latex:
        sign = -1 if latex.group(1) else 1
        return None if int(latex.group(3)) == 0 else sign * Fraction(int(latex.group(2)), int(latex.group(3)))
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if len(text) > 60 or not _PLAIN_NUMBER.fullmatch(text):
        return None  # also keeps huge literals away from Fraction
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


# ---- math-verify in a worker process ----


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
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from sftkey.score import _worker_main; _worker_main()"],
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


_WORKER = _MathVerifyWorker()
atexit.register(_WORKER.close)


def _worker_main() -> None:
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


def _math_delimited(answer: str) -> str:
    """`answer` inside `$...$`, unless it already has math delimiters (`$`, `\\(`, `\\[`) or a `\\boxed`.

    math-verify's LaTeX extractor reads only delimited LaTeX: bare, `\\{1,2\\}` is not found and `\\log_2 8`
    is read as the number 8.
    """
    return answer if _MATH_DELIMITER.search(answer) else f"${answer}$"


# ---- equivalence ----


def answers_match(
    pred: str, gold: str, dataset: str, *, timeout_s: float = MATH_VERIFY_TIMEOUT_S
) -> tuple[bool, str]:
    """(equal, reason) for a predicted and a gold answer; never raises.

    Math data sets (`MATH_DATASETS`): equal when the two strings are the same up to whitespace (reason
    `same text up to whitespace`), else math-verify's verdict: `verify(parse(gold), parse(pred))`, both passed
    through `_math_delimited`, in a worker process limited to `timeout_s` seconds. Reasons: `equal (math-verify)`,
    `not equal (math-verify)`, `math-verify: could not parse prediction` (or `gold answer`), `math-verify timeout`.
    Other data sets: when the gold answer is a number, the prediction must be the same number (currency sign,
    thousands commas, `%` and one trailing unit word are dropped: `$1,000 dollars` = 1000); otherwise the two
    are compared as text, ignoring case, surrounding whitespace and a trailing `.` (reasons `equal as numbers`,
    `same text`, or why not).
    """
    pred = "" if pred is None else str(pred)
    gold = "" if gold is None else str(gold)
    if not gold.strip():
        return False, "empty gold answer"
    if not pred.strip():
        return False, "empty prediction"
    if _dataset_key(dataset) in MATH_DATASETS:
        return _math_match(pred, gold, timeout_s)
    return _plain_match(pred, gold)


def _plain_match(pred: str, gold: str) -> tuple[bool, str]:
    gold_number = parse_number(gold, units=True)
    if gold_number is None:
        same = _clean(pred).strip().rstrip(".").casefold() == _clean(gold).strip().rstrip(".").casefold()
        return (True, "same text") if same else (False, "texts differ")
    pred_number = parse_number(pred, units=True)
    if pred_number is None:
        return False, "prediction is not a number"
    return (True, "equal as numbers") if pred_number == gold_number else (False, "numbers differ")


def _math_match(pred: str, gold: str, timeout_s: float) -> tuple[bool, str]:
    # Same text is the same answer: no need to pay the worker's round trip (math-verify agrees on every
    # MATH-500 gold answer compared with itself).
    if pred.split() == gold.split():
        return True, "same text up to whitespace"
    return _WORKER.compare(_math_delimited(pred), _math_delimited(gold), timeout_s)


def _clean(text: str) -> str:
    """Unicode compatibility form (full-width digits become ASCII) with the minus sign as `-`."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def _dataset_key(dataset: str) -> str:
    """`MATH-500`, `math_500` and `math500` name the same data set."""
    return re.sub(r"[^a-z0-9]", "", str(dataset).lower())


# ---- scoring and summary ----


def score_output(
    output: str, gold: str, dataset: str, tagged: bool = True, *, timeout_s: float = MATH_VERIFY_TIMEOUT_S
) -> dict:
    """Score one generated response; never raises (a None or non-text output scores as empty).

    Keys:
      format_ok: `check_format(output)`; always False for an untagged arm (`tagged=False`).
      strict_correct: the strict answer matches `gold` (tagged: the single closed Answer block, whatever else the
        output holds; untagged: the line after the last `####`).
      lenient_correct: strict_correct, or the lenient answer (`extract_lenient_answer`) matches.
      pred_strict, pred_lenient: the extracted answers (None when absent).
      reasoning_chars: characters of `reasoning_text` (the Thinking content for a well-formatted output).
      reason: '' when strict_correct, else why the strict answer is wrong.
    """
    output = output if isinstance(output, str) else ""
    pred_strict = extract_tagged_answer(output) if tagged else extract_plain_answer(output)
    if pred_strict is None:
        strict_ok, reason = False, "no single closed Answer block" if tagged else "no #### answer line"
    else:
        strict_ok, reason = answers_match(pred_strict, gold, dataset, timeout_s=timeout_s)
    pred_lenient = extract_lenient_answer(output, dataset)
    lenient_ok = strict_ok or (
        pred_lenient is not None and answers_match(pred_lenient, gold, dataset, timeout_s=timeout_s)[0]
    )
    return {
        "format_ok": tagged and check_format(output),
        "strict_correct": strict_ok,
        "lenient_correct": lenient_ok,
        "pred_strict": pred_strict,
        "pred_lenient": pred_lenient,
        "reasoning_chars": len(reasoning_text(output, tagged)),
        "reason": "" if strict_ok else reason,
    }


def summarize(scores: Sequence[dict], cut_by_length: Sequence[bool] | None = None,
              tagged: bool = True) -> dict[str, float | None]:
    """Aggregate `score_output` results into the metrics named in `METRIC_NAMES`.

    composite = 0.7 * strict_accuracy + 0.3 * format_accuracy (the paper's score, with strict accuracy standing in
    for its LLM judge). An untagged arm (`tagged=False`) has no format to judge: its format_accuracy and composite
    are None (n/a), never 0 and 0.7 * accuracy, which would read as comparable to a tagged arm's.
    length_cap_share: the share of generations stopped by the token limit, from `cut_by_length` (one flag per
    score); NaN when it is not given, because 0 would claim none was cut.
    """
    if not scores:
        raise ValueError("summarize: got no scores; score at least one output first")
    if cut_by_length is not None and len(cut_by_length) != len(scores):
        raise ValueError(f"summarize: cut_by_length has {len(cut_by_length)} flags for {len(scores)} scores")
    n = len(scores)
    strict = sum(bool(s["strict_correct"]) for s in scores) / n
    fmt = sum(bool(s["format_ok"]) for s in scores) / n if tagged else None
    return {
        "strict_accuracy": strict,
        "lenient_accuracy": sum(bool(s["lenient_correct"]) for s in scores) / n,
        "format_accuracy": fmt,
        "composite": None if fmt is None else COMPOSITE_WEIGHTS[0] * strict + COMPOSITE_WEIGHTS[1] * fmt,
        "mean_reasoning_chars": sum(s["reasoning_chars"] for s in scores) / n,
        "length_cap_share": float("nan") if cut_by_length is None else sum(map(bool, cut_by_length)) / n,
        "n": n,
    }
