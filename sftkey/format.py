"""The response formats: the paper's tagged template and the plain worked solution.

One place for the tag strings; everything that writes or parses a response imports them from here.
"""

from dataclasses import dataclass

THINK_OPEN = "<Thinking>"
THINK_CLOSE = "</Thinking>"
ANSWER_OPEN = "<Answer>"
ANSWER_CLOSE = "</Answer>"

# The plain (untagged) form used by the SFT arm ends like a GSM8K solution.
PLAIN_ANSWER_MARKER = "####"


@dataclass(frozen=True)
class Response:
    """A rendered assistant response and where its key answer starts (it runs to the end of `text`).

    Tagged: the answer span starts right after `</Thinking>` (the method's stage-2 span: ` <Answer> ... </Answer>`).
    Plain: it starts at the newline before `####`.
    """

    text: str
    answer_start: int


def render_tagged(reasoning: str, answer: str) -> Response:
    """`<Thinking> {reasoning} </Thinking> <Answer> {answer} </Answer>` (the paper's template)."""
    thinking = f"{THINK_OPEN} {reasoning} {THINK_CLOSE}"
    return Response(f"{thinking} {ANSWER_OPEN} {answer} {ANSWER_CLOSE}", len(thinking))


def render_plain(reasoning: str, answer: str) -> Response:
    """The untagged worked solution for the SFT arm: reasoning, then `#### {answer}` on its own line."""
    return Response(f"{reasoning}\n{PLAIN_ANSWER_MARKER} {answer}", len(reasoning))


def render(reasoning: str, answer: str, tagged: bool) -> Response:
    return render_tagged(reasoning, answer) if tagged else render_plain(reasoning, answer)
