"""The tasks' data: sftkey's own questions and gold answers, read by sftkey's loader (lm-eval's `custom_dataset`).

lm-eval calls `tagged_dataset` with the task's `dataset_kwargs` and metadata, which also holds `--metadata` (JSON)
and the model args, so

    lm_eval ... --metadata '{"data_path": "/data", "split": "test", "seed": 0, "limit": 50}'

picks exactly the questions of `sftkey eval --data-path /data --split test --seed 0 --limit 50` (each key optional;
defaults: sftkey's data sources, ../shared/data first, the test split, seed 0, all questions; `test_fraction` of a
carved single-split set as in DataConfig). lm-eval's own `--limit N` then keeps the first N of those. Only sftkey is imported here: the folder works from any working directory.
"""

from __future__ import annotations

import dataclasses


def data_config(dataset: str, metadata: dict):
    """The sftkey DataConfig the metadata names (other keys, e.g. the model args and the version, are not ours)."""
    from sftkey.data import DataConfig

    limit, fraction = metadata.get("limit"), metadata.get("test_fraction")
    return DataConfig(dataset, str(metadata.get("split") or "test"), path=metadata.get("data_path"),
                      limit=None if limit is None else int(limit), seed=int(metadata.get("seed") or 0),
                      test_fraction=DataConfig.test_fraction if fraction is None else float(fraction))


def tagged_dataset(dataset: str, **metadata) -> dict:
    """{"test": uid, question and gold answer of each annotated record}, as `sftkey eval` scores them.

    `dataset` comes from the task's `dataset_kwargs`. SVAMP has one split: `test` is the half sftkey carves by
    seed and scores on (never trained on)."""
    from datasets import Dataset
    from sftkey.evaluate import gold_records

    annotated, _ = gold_records(data_config(dataset, metadata))
    return {"test": Dataset.from_list([{"uid": a.uid, "question": a.question, "answer": a.answer} for a in annotated])}


def gsm8k_reference(**metadata) -> dict:
    """lm-eval's built-in gsm8k rows (question, worked solution), offline: all of train for the shots, and test."""
    from datasets import Dataset
    from sftkey.data import load_records

    test = data_config("gsm8k", metadata)
    splits = {}
    for name, config in (("train", dataclasses.replace(test, split="train", limit=None)), ("test", test)):
        records, _ = load_records(config)
        splits[name] = Dataset.from_list([{"uid": r.uid, "question": r.question, "answer": r.solution} for r in records])
    return splits
