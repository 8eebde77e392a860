"""Scoring one response against a gold answer, and the summary metrics of a list of scores."""

from __future__ import annotations

from typing import Sequence

from sftkey.score.extract import (
    check_format,
    extract_lenient_answer,
    extract_plain_answer,
    extract_tagged_answer,
    reasoning_text,
)
from sftkey.score.math_worker import MATH_VERIFY_TIMEOUT_S

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


def answers_match(
    pred: str, gold: str, dataset: str, *, timeout_s: float = MATH_VERIFY_TIMEOUT_S
) -> tuple[bool, str]:
    """(equal, reason) for a predicted and a gold answer, by the data set's scorer; never raises.

    Empty answers are never equal. Otherwise the scorer of `dataset`'s registry entry decides
    (sftkey.data.registry): `match_math` for math expressions (math-verify, limited to `timeout_s` seconds),
    `match_number_or_text` for numbers. A name outside the registry gets the number scorer.
    """
    from sftkey.data.registry import scoring_spec  # inside: the registry imports this package's scorers

    pred = "" if pred is None else str(pred)
    gold = "" if gold is None else str(gold)
    if not gold.strip():
        return False, "empty gold answer"
    if not pred.strip():
        return False, "empty prediction"
    return scoring_spec(dataset).scorer(pred, gold, timeout_s)


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
