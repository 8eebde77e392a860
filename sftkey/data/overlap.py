"""Train/test overlap: can two data configs share records, which records they share, and a held-out carve.

Records are the same record when they have the same uid within one built-in data set (uids are stable across
sources: local files, `save_to_disk` folders and the hub give the same ids), or the same question text after
whitespace and case folding (which also catches a JSONL copy of a benchmark's questions).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sftkey.data.records import Record
from sftkey.data.sources import DataConfig, native_splits

CARVED = ("train", "test")  # the two halves of a single-split data set, carved by (seed, test_fraction)


def is_carved(config: DataConfig) -> bool:
    """True when `config.split` is a train/test half carved out of a single-split data set (SVAMP, MATH-500)."""
    native = native_splits(config.dataset)
    return config.split in CARVED and config.split not in native and len(native) == 1


def can_share_records(a: DataConfig, b: DataConfig) -> bool:
    """False only when `a` and `b` provably select disjoint records, whatever the source.

    Disjoint: two different built-in data sets; two different native splits of one (GSM8K train and test); or the
    two halves of one carve, with the same seed and test fraction. Anything else may overlap (the same split, two
    carves with other seeds, any JSONL file, whose records are known only by their text).
    """
    if a.dataset == "jsonl" or b.dataset == "jsonl":
        return True
    if a.dataset != b.dataset:
        return False
    if is_carved(a) and is_carved(b) and a.split != b.split:
        return (a.seed, a.test_fraction) != (b.seed, b.test_fraction)
    if not is_carved(a) and not is_carved(b):
        return a.split == b.split
    return True  # the same half twice, or a carved half and the whole data set


def shared_uids(a: DataConfig, a_records: Sequence[Record], b: DataConfig, b_records: Sequence[Record]) -> list[str]:
    """Uids of `b_records` that are also in `a_records`: by uid within one built-in data set, or by question text."""
    same_ids = a.dataset == b.dataset and a.dataset != "jsonl"  # JSONL uids are line positions, not identities
    a_uids = {r.uid for r in a_records} if same_ids else set()
    a_texts = {question_key(r.question) for r in a_records}
    return [r.uid for r in b_records if r.uid in a_uids or question_key(r.question) in a_texts]


def question_key(question: str) -> str:
    return " ".join(question.split()).casefold()


def held_out_config(training: DataConfig, benchmark: DataConfig) -> DataConfig:
    """`benchmark` with the carve of `training` when both are halves of the same single-split data set.

    A benchmark of SVAMP `test` next to training on SVAMP `train --seed 1` must be carved with seed 1 too: with
    any other seed it shares about 70% of its questions with the training half.
    """
    if benchmark.dataset == training.dataset and is_carved(benchmark) and is_carved(training):
        return dataclasses.replace(benchmark, seed=training.seed, test_fraction=training.test_fraction)
    return benchmark


def describe(config: DataConfig) -> str:
    """`svamp train (carve seed 1, test fraction 0.3)`, `gsm8k test, 50 records (seed 0)`, `jsonl train (path)`."""
    text = f"{config.dataset} {config.split}"
    details = []
    if is_carved(config):
        details.append(f"carve seed {config.seed}, test fraction {config.test_fraction}")
    if config.limit is not None:
        details.append(f"at most {config.limit} records (seed {config.seed})")
    if config.path:
        details.append(str(config.path))
    return text + (f" ({'; '.join(details)})" if details else "")
