"""Numbers in answers: exact parsing (`$1,000`, `3/4`, `\\frac{1}{2}`, `20%`) and the number-or-text match."""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)|[-+]?\d+/\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CURRENCY_PREFIX = re.compile(r"^([-+]?)\s*(?:\\\$|\$|€|£)\s*")
_UNIT_SUFFIX = re.compile(r"^(.*\d)\s*[A-Za-z]+\.?$")  # "18 dollars", "5cm": one word after a number
_LATEX_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")


def parse_number(text: str, units: bool = False) -> Fraction | None:
    """`text` as an exact number, else None.

    Accepts a sign, a leading currency sign ($, \\$, €, £), thousands commas in valid groups of three (`1,000`),
    a decimal or `a/b` fraction, `\\frac{a}{b}` with integers, and a trailing `%` (dropped: `50%` = 50, because
    gold answers state percentages as the number before the sign). With `units`, one trailing word of letters is
    dropped (`18 dollars` = 18); callers use it only where the gold answer is a plain number.
    """
    text = clean(text).rstrip(".").strip()
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


def match_number_or_text(pred: str, gold: str, timeout_s: float | None = None) -> tuple[bool, str]:
    """The scorer of number answers: the same number when the gold answer is one, else the same text.

    Numbers drop a currency sign, thousands commas, `%` and one trailing unit word (`$1,000 dollars` = 1000);
    text ignores case, surrounding whitespace and a trailing `.`. `timeout_s` is unused (instant).
    """
    gold_number = parse_number(gold, units=True)
    if gold_number is None:
        same = clean(pred).strip().rstrip(".").casefold() == clean(gold).strip().rstrip(".").casefold()
        return (True, "same text") if same else (False, "texts differ")
    pred_number = parse_number(pred, units=True)
    if pred_number is None:
        return False, "prediction is not a number"
    return (True, "equal as numbers") if pred_number == gold_number else (False, "numbers differ")


def clean(text: str) -> str:
    """Unicode compatibility form (full-width digits become ASCII) with the minus sign as `-`."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")
