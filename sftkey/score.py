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
- equivalence: see `answers_match`.
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

# Data sets whose answers are LaTeX and get the math normalisation and the symbolic check.
MATH_DATASETS = frozenset({"math", "math500"})

SYMPY_TIMEOUT_S = 5.0  # a symbolic comparison slower than this counts as not equal
_WORKER_START_TIMEOUT_S = 60.0  # importing sympy in a fresh interpreter; not charged to the comparison
_MAX_SYMPY_CHARS = 300  # longer expressions are not sent to sympy at all

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
_KEPT_SPACE = "\x00"  # marks the one space normalisation keeps, while all others are removed

# What `to_sympy_text` may emit: numbers, one-letter variables, π and √ (from \pi and \sqrt), operators.
_SYMPY_TOKEN = re.compile(r"\s*(\d+\.\d+|\d+|[A-Za-z]|π|√|\*\*|[-+*/(),])\s*")
_LATEX_SYMBOLS = {"pi": "π", "cdot": "*", "times": "*", "div": "/"}


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


# ---- math normalisation ----


def normalize_math(answer: str) -> str:
    """A LaTeX answer in a canonical spelling, so that equal answers usually compare equal as strings.

    Unwraps a whole-answer `\\boxed{}`, drops `\\$` and surrounding `$`, `\\left`/`\\right`, spacing commands,
    degrees, `%`, trailing `\\text{...}` units (when something precedes them), a trailing `.`, and a leading
    `x =`; unwraps remaining `\\text{...}`; spells `\\dfrac`/`\\tfrac` as `\\frac` and `\\frac12` as `\\frac{1}{2}`.
    Whitespace is removed except a single space that ends a command name before a letter (`\\pi r`).
    """
    s = _clean(answer).strip()
    boxed = last_boxed(s)
    if boxed is not None and s.startswith("\\boxed") and s.endswith("}"):
        s = boxed
    s = s.replace("\\$", "").strip().strip("$")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,;:!> ]|\\q?quad(?![A-Za-z])|~", " ", s)  # spacing commands
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"(?<=\S)\s*\\(?:text|textbf|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?\s*\.?$", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", lambda m: m.group(1) + _KEPT_SPACE, s)  # `\pi r` is not `\pir`
    s = re.sub(r"\s+", "", s).replace(_KEPT_SPACE, " ")
    s = s.rstrip(".").replace("{,}", ",")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"^\.(?=\d)|(?<=-)\.(?=\d)", "0.", s)
    if s.count("=") == 1:
        left, right = s.split("=")
        if re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?", left):  # `x=5`, `a_1=3`: keep the value
            s = right
    return s


def to_sympy_text(latex: str) -> str | None:
    """A normalised LaTeX expression as text for `sympy.sympify`, else None when it uses anything else.

    Handles `\\frac{a}{b}`, `\\sqrt{x}`, `\\sqrt[n]{x}`, `^`, `\\pi`, `\\cdot`, `\\times`, `\\div`, braces,
    parentheses, commas (tuples), numbers and one-letter variables; adjacent factors multiply (`2\\sqrt{2}`).
    The result holds only those tokens, which is what makes it safe to hand to sympify (it evaluates text).
    """
    if not latex or len(latex) > _MAX_SYMPY_CHARS:
        return None
    try:
        flat = _expand_latex(latex)
    except ValueError:
        return None
    tokens = []
    pos = 0
    while pos < len(flat):
        match = _SYMPY_TOKEN.match(flat, pos)
        if match is None:
            return None
        tokens.append({"π": "pi", "√": "sqrt"}.get(match.group(1), match.group(1)))
        pos = match.end()
    return "".join(_with_implicit_products(tokens)) or None



def _expand_latex(s: str) -> str:
    """LaTeX -> infix text with `π` and `√` marking the constant and the function; ValueError if unsupported."""
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            name, i = _read_command(s, i)
            if name == "frac":
                numerator, i = _read_argument(s, i)
                denominator, i = _read_argument(s, i)
                out.append(f"(({_expand_latex(numerator)})/({_expand_latex(denominator)}))")
            elif name == "sqrt" and i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close < 0:
                    raise ValueError("unclosed root index")
                radicand, end = _read_argument(s, close + 1)
                out.append(f"(({_expand_latex(radicand)})**(1/({_expand_latex(s[i + 1 : close])})))")
                i = end
            elif name == "sqrt":
                radicand, i = _read_argument(s, i)
                out.append(f"√({_expand_latex(radicand)})")
            elif name in _LATEX_SYMBOLS:
                out.append(_LATEX_SYMBOLS[name])
            else:
                raise ValueError(f"unsupported command \\{name}")
        elif ch == "{":
            group, i = _read_argument(s, i)
            out.append(f"({_expand_latex(group)})")
        elif ch == "^":
            exponent, i = _read_argument(s, i + 1)
            out.append(f"**({_expand_latex(exponent)})")  # parenthesised: `x^23` is x^2 * 3
        elif ch == "}":
            raise ValueError("unbalanced }")
        else:
            out.append(ch)
            i += 1
    return "".join(out)



def _read_command(s: str, i: int) -> tuple[str, int]:
    """The name of the command at `s[i] == '\\'` and the index after it."""
    match = re.match(r"\\([A-Za-z]+|.)", s[i:])
    if match is None:
        raise ValueError("dangling backslash")
    return match.group(1), i + match.end()


def _read_argument(s: str, i: int) -> tuple[str, int]:
    """One macro argument at `i`: a braced group's inside, a command, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] == "{":
        end = _matching_brace(s, i)
        if end is None:
            raise ValueError("unbalanced {")
        return s[i + 1 : end], end + 1
    if s[i] == "\\":
        name, end = _read_command(s, i)
        return "\\" + name, end
    return s[i], i + 1


def _with_implicit_products(tokens: list[str]) -> list[str]:
    """Insert `*` where LaTeX juxtaposes factors: `2 sqrt(2)`, `2 pi`, `x y`, `) (`."""
    out: list[str] = []
    for token in tokens:
        if out and _ends_factor(out[-1]) and _starts_factor(token):
            out.append("*")
        out.append(token)
    return out


def _ends_factor(token: str) -> bool:
    return token[0].isdigit() or token == ")" or (token.isalpha() and token != "sqrt")


def _starts_factor(token: str) -> bool:
    return token[0].isdigit() or token == "(" or token.isalpha()


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


# ---- symbolic comparison in a worker process ----


class _SympyWorker:
    """A child interpreter that compares expressions with sympy, killed and replaced when one takes too long.

    A process rather than a signal or a thread: sympy spends long stretches inside single C calls (big integer
    powers such as 9^(9^9)) that neither a signal handler nor a thread can interrupt, but a process can be killed.
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
                return False, "sympy worker failed to start"
            try:
                self._proc.stdin.write(json.dumps([pred, gold]) + "\n")
                self._proc.stdin.flush()
                line = self._lines.get(timeout=timeout_s)
            except queue.Empty:
                self.close()
                return False, "sympy timeout"
            except OSError:
                self.close()
                return False, "sympy worker died"
            if line is None:
                self.close()
                return False, "sympy worker died"
            equal, reason = json.loads(line)
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


_WORKER = _SympyWorker()
atexit.register(_WORKER.close)


def _worker_main() -> None:
    """The worker's loop: read `[pred, gold]` JSON lines, answer `[equal, reason]` lines."""
    import sympy  # noqa: F401  (imported before `ready` so its cost is not charged to the first comparison)

    print("ready", flush=True)
    for line in sys.stdin:
        pred, gold = json.loads(line)
        print(json.dumps(_sympy_equal(pred, gold)), flush=True)


def _sympy_equal(pred: str, gold: str) -> list:
    """[equal, reason] for two `to_sympy_text` strings; runs in the worker."""
    import sympy

    names = {letter: sympy.Symbol(letter) for letter in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names.update(pi=sympy.pi, sqrt=sympy.sqrt)  # one-letter names such as E, I, N, S stay plain symbols
    try:
        a = sympy.sympify(pred, locals=names, rational=True)
        b = sympy.sympify(gold, locals=names, rational=True)
        pairs = _element_pairs(a, b, (tuple, sympy.Tuple))
        if pairs is None:
            return [False, "not equal symbolically"]
        equal = all(sympy.simplify(x - y) == 0 for x, y in pairs)
    except Exception as error:  # sympy raises many types on odd input; any of them means "cannot tell"
        return [False, f"sympy error: {type(error).__name__}"]
    return [True, "equal symbolically"] if equal else [False, "not equal symbolically"]


def _element_pairs(a, b, tuple_types: tuple[type, ...]) -> list | None:
    """Pairs to compare: elementwise for tuples of equal length, the pair itself otherwise, None on a mismatch."""
    a_is, b_is = isinstance(a, tuple_types), isinstance(b, tuple_types)
    if a_is and b_is:
        return list(zip(a, b)) if len(a) == len(b) else None
    return None if a_is or b_is else [(a, b)]


# ---- equivalence ----


def answers_match(pred: str, gold: str, dataset: str, *, timeout_s: float = SYMPY_TIMEOUT_S) -> tuple[bool, str]:
    """(equal, reason) for a predicted and a gold answer; never raises.

    Math data sets (`MATH_DATASETS`): both sides go through `normalize_math`, then compare as strings, then as
    numbers (`parse_number`), then symbolically with sympy in a worker process limited to `timeout_s` seconds
    (reason `sympy timeout` when it is exceeded).
    Other data sets: when the gold answer is a number, the prediction must be the same number (currency sign,
    thousands commas, `%` and one trailing unit word are dropped: `$1,000 dollars` = 1000); otherwise the two
    are compared as text, ignoring case, surrounding whitespace and a trailing `.`.
    The reason names how they matched (`same after normalisation`, `equal as numbers`, `equal symbolically`,
    `same text`) or why not.
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
    pred_norm, gold_norm = normalize_math(pred), normalize_math(gold)
    if not pred_norm:
        return False, "empty prediction"
    if pred_norm == gold_norm:
        return True, "same after normalisation"
    pred_number, gold_number = parse_number(pred_norm), parse_number(gold_norm)
    if pred_number is not None and gold_number is not None:
        return (True, "equal as numbers") if pred_number == gold_number else (False, "numbers differ")
    pred_expr, gold_expr = to_sympy_text(pred_norm), to_sympy_text(gold_norm)
    if pred_expr is None or gold_expr is None:
        return False, "not equal after normalisation"
    return _WORKER.compare(pred_expr, gold_expr, timeout_s)


def _clean(text: str) -> str:
    """Unicode compatibility form (full-width digits become ASCII) with the minus sign as `-`."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def _dataset_key(dataset: str) -> str:
    """`MATH-500`, `math_500` and `math500` name the same data set."""
    return re.sub(r"[^a-z0-9]", "", str(dataset).lower())


# ---- scoring and summary ----


def score_output(
    output: str, gold: str, dataset: str, tagged: bool = True, *, timeout_s: float = SYMPY_TIMEOUT_S
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


def summarize(scores: Sequence[dict], cut_by_length: Sequence[bool] | None = None) -> dict[str, float]:
    """Aggregate `score_output` results into the metrics named in `METRIC_NAMES`.

    composite = 0.7 * strict_accuracy + 0.3 * format_accuracy (the paper's score, with strict accuracy standing in
    for its LLM judge). length_cap_share: the share of generations stopped by the token limit, from
    `cut_by_length` (one flag per score); NaN when it is not given, because 0 would claim none was cut.
    """
    if not scores:
        raise ValueError("summarize: got no scores; score at least one output first")
    if cut_by_length is not None and len(cut_by_length) != len(scores):
        raise ValueError(f"summarize: cut_by_length has {len(cut_by_length)} flags for {len(scores)} scores")
    n = len(scores)
    strict = sum(bool(s["strict_correct"]) for s in scores) / n
    fmt = sum(bool(s["format_ok"]) for s in scores) / n
    return {
        "strict_accuracy": strict,
        "lenient_accuracy": sum(bool(s["lenient_correct"]) for s in scores) / n,
        "format_accuracy": fmt,
        "composite": COMPOSITE_WEIGHTS[0] * strict + COMPOSITE_WEIGHTS[1] * fmt,
        "mean_reasoning_chars": sum(s["reasoning_chars"] for s in scores) / n,
        "length_cap_share": float("nan") if cut_by_length is None else sum(map(bool, cut_by_length)) / n,
        "n": n,
    }
