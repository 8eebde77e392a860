"""Answer extraction: the format check and the strict, plain and lenient answers of one response."""

from __future__ import annotations

import re

from sftkey.format import ANSWER_CLOSE, ANSWER_OPEN, PLAIN_ANSWER_MARKER, THINK_CLOSE, THINK_OPEN

TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

_TEMPLATE = re.compile(
    rf"\s*{re.escape(THINK_OPEN)}.*{re.escape(THINK_CLOSE)}\s*{re.escape(ANSWER_OPEN)}.*{re.escape(ANSWER_CLOSE)}\s*",
    re.DOTALL,
)

# A number inside free text: optional minus (not a subtraction), optional currency, thousands groups or digits,
# then a decimal part or a fraction, then an optional percent sign.
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)])-)?(?:\\?\$\s?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+|/\d+)?%?"
)


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
    """Content of the last `\\boxed{...}` (nested braces allowed; `\\boxed 5` too), else None (also when unclosed).

    The one reader of boxed answers: annotation takes MATH gold answers with it, scoring lenient answers.
    """
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
    """What a forgiving reader takes as the answer, by the data set's answer kind (sftkey.data.registry).

    Math expressions: the last `\\boxed{}`, else the last number; numbers: the last number.
    """
    from sftkey.data.registry import MATH, scoring_spec

    if not isinstance(output, str):
        return None
    if scoring_spec(dataset).answer_kind == MATH:
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
