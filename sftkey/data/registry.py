"""One entry per data set: where its rows come from, how its solutions split, how its answers are judged.

Adding a data set is one entry here: a `Source` (sftkey.data.sources), an annotation rule (sftkey.annotate),
its answer kind and scorer (sftkey.score), and its generation cap. The modules that use an entry import this
one inside their functions, because it imports their rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from sftkey.annotate import AnnotationConfig, split_gsm8k, split_jsonl, split_math, split_svamp
from sftkey.data.records import DataError, Record
from sftkey.data.sources import Source, gsm8k_row, jsonl_row, math500_row, svamp_row
from sftkey.score.math_worker import match_math
from sftkey.score.numbers import match_number_or_text

NUMBER = "number"  # answers are numbers (or short text when the gold answer is not a number)
MATH = "math"  # answers are LaTeX expressions; lenient extraction prefers the last `\boxed{}`
GENERIC = "jsonl"  # the entry that judges answers of a data set outside the registry


@dataclass(frozen=True)
class DatasetSpec:
    """Everything sftkey knows about one data set."""

    source: Source  # how its rows load (local files, hub) and become records
    annotation_rule: Callable[[Record, AnnotationConfig], tuple[str, str]]  # record -> (reasoning, answer)
    answer_kind: str  # NUMBER or MATH
    scorer: Callable[[str, str, float], tuple[bool, str]]  # (pred, gold, timeout_s) -> (equal, reason)
    max_new_tokens: int  # the generation cap when none is given


# Caps leave room above each data set's tagged reference answers (SmolLM2 tokens, eos included: GSM8K test p99 239,
# max 315; SVAMP max 56; MATH-500 median 190, p95 654, p99 893): a cap that cuts answers makes accuracy a floor,
# and a model's own answers run longer than the references.
DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(
        Source(gsm8k_row, {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, ("openai/gsm8k", "main"),
               {"train": ("train",), "test": ("test",)}),
        split_gsm8k, NUMBER, match_number_or_text, max_new_tokens=512,
    ),
    "svamp": DatasetSpec(
        Source(svamp_row, {"all": "svamp/SVAMP.json"}, ("ChilleD/SVAMP", None), {"all": ("train", "test")},
               sort_by_uid=True),
        split_svamp, NUMBER, match_number_or_text, max_new_tokens=256,
    ),
    "math500": DatasetSpec(
        Source(math500_row, {"test": "math500/test.jsonl"}, ("HuggingFaceH4/MATH-500", None), {"test": ("test",)}),
        split_math, MATH, match_math, max_new_tokens=1024,
    ),
    "jsonl": DatasetSpec(Source(jsonl_row, {}), split_jsonl, NUMBER, match_number_or_text, max_new_tokens=512),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The entry of `name`, or an error listing the known data sets."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def scoring_spec(name: str) -> DatasetSpec:
    """The entry whose scorer judges answers of `name`: `MATH-500`, `math_500` and `math500` name one data set;
    an unknown name is judged as a generic data set (numbers, else text)."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return DATASETS.get(name) or DATASETS.get(key) or DATASETS[GENERIC]
