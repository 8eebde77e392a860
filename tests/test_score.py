"""Scoring rules on fixed outputs: each case pins the exact result and, for equivalence, the exact reason."""

import math
import time
from fractions import Fraction

import pytest

from sftkey.score import (
    METRIC_NAMES,
    answers_match,
    check_format,
    extract_lenient_answer,
    extract_plain_answer,
    extract_tagged_answer,
    normalize_math,
    parse_number,
    score_output,
    summarize,
    to_sympy_text,
)

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


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("90^{\\circ}", "90"),
        ("10\\text{ inches}^2", "10"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\$5.50", "5.50"),
        ("$x = 3$", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("1\\,000", "1000"),
        ("\\pi r^2", "\\pi r^2"),
        (".5", "0.5"),
    ],
)
def test_normalize_math(answer, expected):
    assert normalize_math(answer) == expected


@pytest.mark.parametrize(
    "latex, expected",
    [
        ("2\\sqrt{2}", "2*sqrt(2)"),
        ("\\frac{1}{2}", "((1)/(2))"),
        ("x^23", "x**(2)*3"),
        ("\\sqrt[3]{8}", "((8)**(1/(3)))"),
        ("\\pi r^2", "pi*r**(2)"),
        ("2\\cdot3", "2*3"),
        ("(1,2)", "(1,2)"),
        ("__import__('os')", None),  # only whitelisted tokens ever reach sympify
        ("\\sin x", None),
        ("\\frac{1}", None),
        ("{1", None),
        ("", None),
    ],
)
def test_to_sympy_text(latex, expected):
    assert to_sympy_text(latex) == expected


MATCH_CASES = [
    # numeric data sets
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
    # math: strings after normalisation
    ("math500", "\\frac{1}{2}", "\\dfrac{1}{2}", True, "same after normalisation"),
    ("math500", "\\tfrac12", "\\frac{1}{2}", True, "same after normalisation"),
    ("math500", "\\left(1,2\\right)", "(1, 2)", True, "same after normalisation"),
    ("math500", "90^\\circ", "90", True, "same after normalisation"),
    ("math500", "5\\text{ cm}", "5", True, "same after normalisation"),
    ("math500", "\\$18.", "18", True, "same after normalisation"),
    ("math500", "$\\frac{3}{4}$", "\\frac{3}{4}", True, "same after normalisation"),
    ("math500", "x = 5", "5", True, "same after normalisation"),
    ("math500", "\\boxed{\\frac{1}{2}}", "\\frac12", True, "same after normalisation"),
    ("MATH-500", "\\text{Evelyn}", "Evelyn", True, "same after normalisation"),
    # math: numbers
    ("math500", "\\frac{2}{4}", "\\frac{1}{2}", True, "equal as numbers"),
    ("math500", "0.5", "\\frac{1}{2}", True, "equal as numbers"),
    ("math500", "-\\frac{3}{4}", "-0.75", True, "equal as numbers"),
    ("math500", "1,000", "1000", True, "equal as numbers"),
    ("math500", "3", "4", False, "numbers differ"),
    # math: only symbolically equal
    ("math500", "2\\sqrt{2}", "\\sqrt{8}", True, "equal symbolically"),
    ("math500", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True, "equal symbolically"),
    ("math500", "x^2+2x+1", "(x+1)^2", True, "equal symbolically"),
    ("math500", "\\pi r^2", "r^2\\pi", True, "equal symbolically"),
    ("math500", "(2\\sqrt{2}, 1)", "(\\sqrt{8}, 1)", True, "equal symbolically"),
    ("math500", "\\sqrt{3}", "3", False, "not equal symbolically"),
    ("math500", "(1,2)", "(2,1)", False, "not equal symbolically"),
    ("math500", "(1,2)", "(1,2,3)", False, "not equal symbolically"),
    # math: nothing to compare
    ("math500", "\\sin x", "\\cos x", False, "not equal after normalisation"),
    ("math500", "答案", "3", False, "not equal after normalisation"),
    ("math500", "$$", "3", False, "empty prediction"),
]


@pytest.mark.parametrize("dataset, pred, gold, equal, reason", MATCH_CASES)
def test_answers_match(dataset, pred, gold, equal, reason):
    assert answers_match(pred, gold, dataset) == (equal, reason)


def test_answers_match_takes_numeric_gold():
    assert answers_match("18", 18, "gsm8k") == (True, "equal as numbers")


def test_sympy_timeout_returns_quickly_and_the_worker_recovers():
    assert answers_match("2\\sqrt{2}", "\\sqrt{8}", "math500")[0]  # the worker is up: time only the comparison
    start = time.monotonic()
    result = answers_match("9^{9^{9}}", "1", "math500", timeout_s=0.2)  # a 370-million-digit integer
    elapsed = time.monotonic() - start
    assert result == (False, "sympy timeout")
    assert elapsed < 2.0
    assert answers_match("2\\sqrt{2}", "\\sqrt{8}", "math500") == (True, "equal symbolically")


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
          reasoning_chars=19, reason="not equal symbolically")),
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
