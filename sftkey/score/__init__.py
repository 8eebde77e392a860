"""Scoring one generated response against a gold answer, and summarising a list of scores.

Modules, one job each: `extract` (format check and answer extraction), `numbers` (exact numbers and the
number-or-text match), `math_worker` (math-verify in a killable worker process), `scoring` (score_output,
answers_match, summarize). Which match a data set uses is its entry in sftkey.data.registry.

Rules, in one place:
- format: `<Thinking> ... </Thinking> <Answer> ... </Answer>` and nothing else (whitespace around and between is
  fine); each of the four tags occurs exactly once. Block contents may be anything without a tag, even empty.
- strict answer (tagged arms): the content of the Answer block, used only when the output holds exactly one
  `<Answer>` and one `</Answer>`, in that order, with no Thinking tag inside. It does not require the rest of the
  format (a missing Thinking block or trailing text), so strict accuracy and format accuracy measure different
  things and the composite score does not count a format failure twice.
- strict answer (plain arm): the rest of the line after the last `####`.
- lenient answer: math-expression data sets: the last `\\boxed{...}`, else the last number; others: the last
  number. lenient_correct = strict_correct or the lenient answer matches, so lenient accuracy >= strict accuracy.
- equivalence, math-expression data sets: math-verify's verdict (see `math_worker`); strings equal up to
  whitespace are equal without asking it.
- equivalence, number data sets: the same number when the gold answer is a number, else the same text; see
  `numbers.match_number_or_text`.
"""

from sftkey.score.extract import (
    TAGS,
    check_format,
    extract_lenient_answer,
    extract_plain_answer,
    extract_tagged_answer,
    last_boxed,
    last_number,
    reasoning_text,
)
from sftkey.score.math_worker import MATH_VERIFY_TIMEOUT_S, match_math
from sftkey.score.numbers import match_number_or_text, parse_number
from sftkey.score.scoring import COMPOSITE_WEIGHTS, METRIC_NAMES, answers_match, score_output, summarize

__all__ = [
    "COMPOSITE_WEIGHTS", "MATH_VERIFY_TIMEOUT_S", "METRIC_NAMES", "TAGS", "answers_match", "check_format",
    "extract_lenient_answer", "extract_plain_answer", "extract_tagged_answer", "last_boxed", "last_number",
    "match_math", "match_number_or_text", "parse_number", "reasoning_text", "score_output", "summarize",
]
