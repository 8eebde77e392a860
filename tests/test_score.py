"""Scoring rules on fixed outputs: each case pins the exact result and, for equivalence, the exact reason."""

import math
import time
from fractions import Fraction

import pytest
from math_verify import parse, verify

from sftkey.score import (
    METRIC_NAMES,
    answers_match,
    check_format,
    extract_lenient_answer,
    extract_plain_answer,
    extract_tagged_answer,
    parse_number,
    score_output,
    summarize,
)
from sftkey.score.math_worker import WORKER, math_delimited

GOOD = "<Thinking> 2 + 2 = 4 </Thinking> <Answer> 4 </Answer>"

FORMAT_CASES = [
    (GOOD, True),
    ("\n  <Thinking>a</Thinking>\n\n<Answer>4</Answer>\n", True),
    ("<Thinking></Thinking><Answer></Answer>", True),  # structure only; an empty answer fails strict instead
    ("<Thinking> 二加二等于四 </Thinking> <Answer> 四 </Answer>", True),
    ("Sure! " + GOOD, False),
    ("<Thinking> a </Thinking> so <Answer> 4 </Answer>", False),
    (GOOD + " Question: what is 3 + 3?", False),
    (GOOD + " <Answer> 5 </Answer>", False),
    ("<Thinking> a </Thinking> <Answer> 4", False),
    ("<Thinking> a <Answer> 4 </Answer>", False),
    ("<Thinking> a <Thinking> b </Thinking> </Thinking> <Answer> 4 </Answer>", False),
    ("<Thinking> a <Answer> 4 </Answer> </Thinking> <Answer> 4 </Answer>", False),
    ("<Answer> 4 </Answer> <Thinking> a </Thinking>", False),
    ("<Answer> 4 </Answer>", False),
    ("<thinking> a </thinking> <answer> 4 </answer>", False),
    ("", False),
    ("答案是四", False),
]


@pytest.mark.parametrize("output, expected", FORMAT_CASES)
def test_check_format(output, expected):
    assert check_format(output) is expected


TAGGED_CASES = [
    (GOOD, "4"),
    (GOOD + " Question: what is 3 + 3?", "4"),  # trailing text costs the format, not the answer
    ("<Answer> 4 </Answer>", "4"),
    ("<Thinking> a </Thinking> <Answer>  </Answer>", ""),
    (GOOD + " <Answer> 5 </Answer>", None),
    ("<Thinking> a </Thinking> <Answer> 4", None),
    ("</Answer> 4 <Answer>", None),
    ("<Answer> 4 <Thinking> </Answer>", None),
    ("", None),
]


@pytest.mark.parametrize("output, expected", TAGGED_CASES)
def test_extract_tagged_answer(output, expected):
    assert extract_tagged_answer(output) == expected


@pytest.mark.parametrize(
    "output, expected",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1\nmore\n#### 7\nQuestion: next", "7"),
        ("no marker here", None),
    ],
)
def test_extract_plain_answer(output, expected):
    assert extract_plain_answer(output) == expected


LENIENT_CASES = [
    ("math500", "so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("math500", "first \\boxed{1}, then \\boxed{\\sqrt{3}}", "\\sqrt{3}"),
    ("math500", "$\\boxed 5$", "5"),
    ("math500", "\\boxed{\\frac{1}{2}", "2"),  # unclosed box: fall back to the last number
    ("math500", "the answer is 5.", "5"),
    ("gsm8k", "It costs $1,000 in total.", "$1,000"),
    ("gsm8k", "The temperature is -3.5 degrees", "-3.5"),
    ("gsm8k", "She ate 3/4 of it", "3/4"),
    ("gsm8k", "8 - 3 = 5", "5"),
    ("gsm8k", "10-3", "3"),  # a subtraction, not a negative number
    ("gsm8k", "Ratio 1,2,3", "3"),
    ("gsm8k", "a rise of 20%", "20%"),
    ("gsm8k", "\\boxed{18}", "18"),
    ("gsm8k", "答案是 18。", "18"),
    ("gsm8k", "答案是十八", None),
    ("gsm8k", "", None),
]


@pytest.mark.parametrize("dataset, output, expected", LENIENT_CASES)
def test_extract_lenient_answer(dataset, output, expected):
    assert extract_lenient_answer(output, dataset) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$1,000", Fraction(1000)),
        ("-3.5", Fraction(-7, 2)),
        ("3/4", Fraction(3, 4)),
        ("-$18", Fraction(-18)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("12.", Fraction(12)),
        ("1,00", None),
        ("5/0", None),
        ("1e999999999", None),  # would be a huge integer; refused before Fraction sees it
        ("18 dollars", None),  # units only when asked for
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_parse_number_drops_one_unit_word_when_asked():
    assert parse_number("18 dollars", units=True) == 18
    assert parse_number("18 dollars and 5 cents", units=True) is None


MATCH_CASES = [  # data sets whose answers are numbers (registry answer kind NUMBER)
    ("gsm8k", "1,000", "1000", True, "equal as numbers"),
    ("gsm8k", "1000.0", "1,000", True, "equal as numbers"),
    ("gsm8k", "$18", "18", True, "equal as numbers"),
    ("gsm8k", "18 dollars", "18", True, "equal as numbers"),
    ("gsm8k", "$18.00.", "18", True, "equal as numbers"),
    ("gsm8k", "-3", "-3", True, "equal as numbers"),
    ("gsm8k", "\u22125", "-5", True, "equal as numbers"),
    ("gsm8k", "-3", "3", False, "numbers differ"),
    ("gsm8k", "3/4", "0.75", True, "equal as numbers"),
    ("gsm8k", "50%", "50", True, "equal as numbers"),
    ("gsm8k", "1,00", "100", False, "prediction is not a number"),
    ("gsm8k", "18 dollars and 5 cents", "18", False, "prediction is not a number"),
    ("gsm8k", "The answer is 18", "18", False, "prediction is not a number"),
    ("gsm8k", "十八", "18", False, "prediction is not a number"),
    ("gsm8k", "１８", "18", True, "equal as numbers"),
    ("gsm8k", "", "18", False, "empty prediction"),
    ("gsm8k", "18", "", False, "empty gold answer"),
    ("svamp", "7.0", "7", True, "equal as numbers"),
    ("jsonl", "Yes.", "yes", True, "same text"),
    ("jsonl", "A", "B", False, "texts differ"),
]


@pytest.mark.parametrize("dataset, pred, gold, equal, reason", MATCH_CASES)
def test_answers_match(dataset, pred, gold, equal, reason):
    assert answers_match(pred, gold, dataset) == (equal, reason)


def test_answers_match_takes_numeric_gold():
    assert answers_match("18", 18, "gsm8k") == (True, "equal as numbers")


def math_verify_says(pred: str, gold: str) -> bool:
    """math-verify called directly on the answers in `$...$` (its timeouts off: they use signals)."""
    return verify(parse(f"${gold}$", parsing_timeout=None), parse(f"${pred}$", parsing_timeout=None),
                  timeout_seconds=None)


EQUAL, NOT_EQUAL = "equal (math-verify)", "not equal (math-verify)"
MATH_CASES = [
    # (pred, gold, equal, reason): each verdict is math-verify's own, checked against it in the test
    ("\\{3,2,1\\}", "\\{1,2,3\\}", True, EQUAL),  # sets in another order
    ("\\{1,2\\}", "\\{1,2,3\\}", False, NOT_EQUAL),
    ("2, 1", "1, 2", True, EQUAL),  # a bare list is read as a set: order does not count
    ("1, 2, 2", "1, 2", True, EQUAL),  # ... nor do repeats
    ("1, 3", "1, 2", False, NOT_EQUAL),
    ("(2, 1)", "(1, 2)", False, NOT_EQUAL),  # an ordered pair: order counts
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True, EQUAL),
    ("\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False, NOT_EQUAL),
    ("\\log_2 8", "3", True, EQUAL),
    ("\\log_2 8", "4", False, NOT_EQUAL),
    ("2\\frac{1}{2}", "\\frac{5}{2}", True, EQUAL),  # a mixed number ...
    ("2\\frac{1}{2}", "1", False, NOT_EQUAL),  # ... not the product 2 * 1/2
    ("(1,2]", "(1, 2]", True, EQUAL),
    ("[1, 2]", "(1, 2]", False, NOT_EQUAL),
    ("\\text{no}", "\\text{on}", False, NOT_EQUAL),  # words are words, not products of letters
    ("no", "\\text{on}", False, NOT_EQUAL),
    ("Evelyn", "\\text{Evelyn}", True, EQUAL),
    ("C", "\\text{(C)}", True, EQUAL),  # multiple-choice letters
    ("(C)", "\\text{(C)}", True, EQUAL),
    ("\\text{(D)}", "\\text{(C)}", False, NOT_EQUAL),
    ("\\frac{1}{2}", "\\frac{1}{3}", False, NOT_EQUAL),
    ("0.5", "\\frac{1}{2}", True, EQUAL),
    ("\\dfrac{2}{4}", "\\frac12", True, EQUAL),
    ("0.33", "\\frac{1}{3}", False, NOT_EQUAL),
    ("2\\sqrt{2}", "\\sqrt{8}", True, EQUAL),
    ("\\sqrt{3}", "3", False, NOT_EQUAL),
    ("x^2+2x+1", "(x+1)^2", True, EQUAL),
    ("x = 5", "5", True, EQUAL),
    ("90^\\circ", "90", True, EQUAL),
    ("10\\%", "10", True, EQUAL),
    ("\\$18", "18", True, EQUAL),
    # math-verify's limits, pinned so that a new version that changes them shows up here
    ("\\$18.", "18", False, NOT_EQUAL),  # read as the text `18.`
    ("1\\,000", "1000", False, NOT_EQUAL),  # read as 1 * 0
    ("52_9", "52_8", True, EQUAL),  # the base subscript is dropped (6 MATH-500 answers are in a base)
    ("0.0000673", "0.0000672", True, EQUAL),  # numbers are compared rounded to 6 decimals
    ("１８", "18", False, "math-verify: could not parse prediction"),  # full-width digits
    # the fast path: the same text up to whitespace, without the worker
    ("\\frac{1}{2} ", "\\frac{1}{2}", True, "same text up to whitespace"),
    ("\\text{no  on}", "\\text{no on}", True, "same text up to whitespace"),
]


@pytest.mark.parametrize("pred, gold, equal, reason", MATH_CASES)
def test_answers_match_on_math_judges_as_math_verify(pred, gold, equal, reason):
    assert answers_match(pred, gold, "math500") == (equal, reason)
    assert math_verify_says(pred, gold) is equal


@pytest.mark.parametrize(
    "pred, gold, reason",
    [
        ("$$", "3", "math-verify: could not parse prediction"),
        ("3", "$$", "math-verify: could not parse gold answer"),
        ("", "3", "empty prediction"),
    ],
)
def test_answers_match_on_math_says_what_could_not_be_read(pred, gold, reason):
    assert answers_match(pred, gold, "MATH-500") == (False, reason)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("\\frac{1}{2}", "$\\frac{1}{2}$"),
        ("\\$18", "$\\$18$"),  # an escaped dollar is not a delimiter
        ("$\\frac{3}{4}$", "$\\frac{3}{4}$"),
        ("\\(x\\)", "\\(x\\)"),
        ("\\[x\\]", "\\[x\\]"),
        ("\\boxed{5}", "\\boxed{5}"),
        ("a \\\\[2pt] b", "$a \\\\[2pt] b$"),  # a line break with spacing, not `\\[`
    ],
)
def test_math_delimited(answer, expected):
    assert math_delimited(answer) == expected


def test_math_verify_timeout_returns_quickly_and_the_worker_recovers():
    assert answers_match("0.5", "\\frac{1}{2}", "math500") == (True, EQUAL)  # the worker is up: time only the check
    start = time.monotonic()
    # A 370-million-digit integer: math-verify works on it for longer than 20 s, in one C call that its own
    # signal-based timeout cannot interrupt, so it is not called directly here.
    result = answers_match("9^{9^{9}}", "1", "math500", timeout_s=0.2)
    elapsed = time.monotonic() - start
    assert result == (False, "math-verify timeout")
    assert elapsed < 2.0
    assert answers_match("0.5", "\\frac{1}{2}", "math500") == (True, EQUAL)


def test_a_dead_worker_is_a_wrong_answer_then_replaced():
    assert answers_match("0.5", "\\frac{1}{2}", "math500") == (True, EQUAL)
    WORKER._proc.kill()  # fault injection: the worker dies between two comparisons
    WORKER._proc.wait()
    assert answers_match("0.5", "\\frac{1}{2}", "math500") == (False, "math-verify worker died")
    assert answers_match("0.5", "\\frac{1}{2}", "math500") == (True, EQUAL)


SCORE_CASES = [
    # (output, gold, dataset, tagged, expected score)
    (GOOD, "4", "gsm8k", True,
     dict(format_ok=True, strict_correct=True, lenient_correct=True, pred_strict="4", pred_lenient="4",
          reasoning_chars=9, reason="")),
    (GOOD + " Question: what is 5 + 5?", "4", "gsm8k", True,
     dict(format_ok=False, strict_correct=True, lenient_correct=True, pred_strict="4", pred_lenient="5",
          reasoning_chars=9, reason="")),
    ("<Thinking> 2 + 2 </Thinking> <Answer> 4 </Answer> <Answer> 5 </Answer>", "5", "gsm8k", True,
     dict(format_ok=False, strict_correct=False, lenient_correct=True, pred_strict=None, pred_lenient="5",
          reasoning_chars=5, reason="no single closed Answer block")),
    ("<Thinking> 2 + 2 </Thinking> <Answer> 4", "4", "gsm8k", True,
     dict(format_ok=False, strict_correct=False, lenient_correct=True, pred_strict=None, pred_lenient="4",
          reasoning_chars=5, reason="no single closed Answer block")),
    ("<Thinking> 6 * 3 </Thinking> <Answer> The total is $18. </Answer>", "18", "gsm8k", True,
     dict(format_ok=True, strict_correct=False, lenient_correct=True, pred_strict="The total is $18.",
          pred_lenient="$18", reasoning_chars=5, reason="prediction is not a number")),
    ("", "4", "gsm8k", True,
     dict(format_ok=False, strict_correct=False, lenient_correct=False, pred_strict=None, pred_lenient=None,
          reasoning_chars=0, reason="no single closed Answer block")),
    (None, "4", "gsm8k", True,
     dict(format_ok=False, strict_correct=False, lenient_correct=False, pred_strict=None, pred_lenient=None,
          reasoning_chars=0, reason="no single closed Answer block")),
    ("<Thinking> 二加二等于四 </Thinking> <Answer> 四 </Answer>", "4", "gsm8k", True,
     dict(format_ok=True, strict_correct=False, lenient_correct=False, pred_strict="四", pred_lenient=None,
          reasoning_chars=6, reason="prediction is not a number")),
    ("3 + 4 = 7\n#### 7", "7", "gsm8k", False,
     dict(format_ok=False, strict_correct=True, lenient_correct=True, pred_strict="7", pred_lenient="7",
          reasoning_chars=9, reason="")),
    ("3 + 4 = 7, so the answer is 7", "7", "gsm8k", False,
     dict(format_ok=False, strict_correct=False, lenient_correct=True, pred_strict=None, pred_lenient="7",
          reasoning_chars=29, reason="no #### answer line")),
    ("<Thinking> half of 1 </Thinking> <Answer> \\frac{2}{4} </Answer>", "\\frac{1}{2}", "math500", True,
     dict(format_ok=True, strict_correct=True, lenient_correct=True, pred_strict="\\frac{2}{4}", pred_lenient="4",
          reasoning_chars=9, reason="")),
    ("<Thinking> so \\boxed{\\sqrt{3}} </Thinking> <Answer> 3 </Answer>", "\\sqrt{3}", "math500", True,
     dict(format_ok=True, strict_correct=False, lenient_correct=True, pred_strict="3", pred_lenient="\\sqrt{3}",
          reasoning_chars=19, reason="not equal (math-verify)")),
]


@pytest.mark.parametrize("output, gold, dataset, tagged, expected", SCORE_CASES)
def test_score_output(output, gold, dataset, tagged, expected):
    assert score_output(output, gold, dataset, tagged) == expected


def test_summarize_exact_metrics():
    scores = [
        dict(strict_correct=True, lenient_correct=True, format_ok=True, reasoning_chars=10),
        dict(strict_correct=True, lenient_correct=True, format_ok=False, reasoning_chars=20),
        dict(strict_correct=False, lenient_correct=True, format_ok=True, reasoning_chars=30),
        dict(strict_correct=False, lenient_correct=False, format_ok=True, reasoning_chars=40),
    ]
    metrics = summarize(scores, cut_by_length=[False, False, False, True])
    assert tuple(metrics) == METRIC_NAMES
    assert all("," not in name for name in metrics)
    assert metrics["strict_accuracy"] == 0.5
    assert metrics["lenient_accuracy"] == 0.75
    assert metrics["format_accuracy"] == 0.75
    assert metrics["composite"] == pytest.approx(0.575, abs=1e-12)
    assert metrics["mean_reasoning_chars"] == 25.0
    assert metrics["length_cap_share"] == 0.25
    assert metrics["n"] == 4


def test_summarize_scored_outputs():
    scores = [score_output(output, gold, dataset, tagged) for output, gold, dataset, tagged, _ in SCORE_CASES]
    metrics = summarize(scores)
    assert metrics["strict_accuracy"] == 4 / 12
    assert metrics["lenient_accuracy"] == 9 / 12
    assert metrics["format_accuracy"] == 5 / 12
    assert math.isnan(metrics["length_cap_share"])


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="no scores"):
        summarize([])
    with pytest.raises(ValueError, match="1 flags for 2 scores"):
        summarize([SCORE_CASES[0][4], SCORE_CASES[1][4]], cut_by_length=[True])
