"""Data sources: the same records from an explicit path, $SFTKEY_DATA_DIR, ../shared/data, or the hub.

Resolution order for a built-in data set: an explicit `path` (a file, a data folder, or a `datasets`
`save_to_disk` folder), then `$SFTKEY_DATA_DIR`, then `../shared/data` next to the project, then the
Hugging Face hub. A row converter per data set turns a local row and a hub row into the same `Record`; a data
set's `Source` (its files, hub repo and converter) is part of its entry in sftkey.data.registry.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from sftkey.data.records import DataError, Record, read_json_list, read_jsonl, require

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DataConfig:
    """Which records to load."""

    dataset: str = field(default="gsm8k", metadata={"help": "an entry of sftkey.data.registry: gsm8k, svamp, math500 or jsonl"})
    split: str = field(default="train", metadata={"help": "native split, or train/test carved from a single-split set"})
    path: str | None = field(default=None, metadata={"help": "explicit file or folder (required for jsonl)"})
    limit: int | None = field(default=None, metadata={"help": "keep at most this many records (seeded sample)"})
    seed: int = field(default=0, metadata={"help": "seed of the subsample and of carved train/test splits"})
    test_fraction: float = field(default=0.3, metadata={"help": "share of a single-split set carved out as test"})
    question_field: str = field(default="question", metadata={"help": "jsonl: field with the question"})
    solution_field: str = field(default="solution", metadata={"help": "jsonl: field with the worked solution"})
    answer_field: str | None = field(default=None, metadata={"help": "jsonl: field with the final answer, if any"})

    def __post_init__(self):
        source_of(self.dataset)  # an unknown name fails here, listing the known ones
        if self.limit is not None and self.limit < 1:
            raise DataError(f"limit must be a positive number of records, got {self.limit}")
        if not 0.0 < self.test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


# --- row converters: one per data set, shared by local files and hub rows ---------------------------------


def gsm8k_row(row: dict, uid: str, origin: str, config: DataConfig) -> Record:
    return Record(uid, require(row, "question", origin), require(row, "answer", origin), None, origin)


def svamp_row(row: dict, uid: str, origin: str, config: DataConfig) -> Record:
    body = require(row, "Body", origin).strip()
    question = require(row, "Question", origin).strip()
    joined = f"{body} {question}" if body.endswith((".", "?", "!", ",")) else f"{body}. {question}"
    answer = format_number(require(row, "Answer", origin), origin)
    return Record(require(row, "ID", origin), joined if body else question, require(row, "Equation", origin).strip(), answer, origin)


def math500_row(row: dict, uid: str, origin: str, config: DataConfig) -> Record:
    return Record(uid, require(row, "problem", origin), require(row, "solution", origin), require(row, "answer", origin), origin)


def jsonl_row(row: dict, uid: str, origin: str, config: DataConfig) -> Record:
    answer = require(row, config.answer_field, origin) if config.answer_field else None
    question = require(row, config.question_field, origin, numbers=False)
    return Record(uid, question, require(row, config.solution_field, origin, numbers=False), answer, origin)


def format_number(value: str, origin: str) -> str:
    """`51.0` -> `51`, `0.5` -> `0.5`: the number as a person writes it, no spurious `.0`."""
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{origin}: answer {value!r} is not a number") from None
    if number == int(number):
        return str(int(number))
    return f"{number:.10f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class Source:
    """Where one data set lives locally and on the hub, and how its rows become records."""

    convert: Callable[[dict, str, str, DataConfig], Record]
    local_files: dict[str, str]  # native split -> file under the data folder
    hub: tuple[str, str | None] | None = None  # (repo, config name)
    hub_splits: dict[str, tuple[str, ...]] = field(default_factory=dict)  # native split -> hub splits, concatenated
    sort_by_uid: bool = False  # the hub splits SVAMP differently: order by ID so both sources agree


def source_of(dataset: str) -> Source:
    """The registry's source of `dataset` (imported here: the registry imports this module's converters)."""
    from sftkey.data.registry import dataset_spec

    return dataset_spec(dataset).source


def native_splits(dataset: str) -> list[str]:
    """The splits a data set ships with (`all` for a single file without named splits)."""
    return list(source_of(dataset).local_files or {"all": ""})


# --- reading ----------------------------------------------------------------------------------------------


def rows_from_file(path: Path) -> Iterable[tuple[dict, str]]:
    """(row, origin) from a .jsonl file or a .json list."""
    if path.suffix == ".json":
        for index, row in enumerate(read_json_list(path)):
            if not isinstance(row, dict):
                raise DataError(f"{path} item {index}: expected a JSON object")
            yield row, f"{path} item {index}"
    else:
        for number, row in read_jsonl(path):
            yield row, f"{path} line {number}"


def rows_from_datasets(dataset_dict, repo: str, splits: tuple[str, ...]) -> Iterable[tuple[dict, str]]:
    """(row, origin) from a `datasets` DatasetDict (the hub, or a `save_to_disk` folder standing in for it)."""
    for split in splits:
        if split not in dataset_dict:
            raise DataError(f"{repo}: has no split {split!r} (splits: {sorted(dataset_dict)})")
        for index, row in enumerate(dataset_dict[split]):
            yield row, f"{repo}[{split}] row {index}"


def default_data_dirs() -> list[tuple[str, Path]]:
    dirs = []
    if os.environ.get("SFTKEY_DATA_DIR"):
        dirs.append(("$SFTKEY_DATA_DIR", Path(os.environ["SFTKEY_DATA_DIR"])))
    dirs.append(("../shared/data", PROJECT_ROOT.parent / "shared" / "data"))
    return dirs


def native_rows(config: DataConfig, native_split: str) -> tuple[list[tuple[dict, str]], str]:
    """The raw rows of one native split and a description of the source they came from."""
    spec = source_of(config.dataset)
    tried = []
    if config.path:
        path = Path(config.path)
        if (path / "dataset_dict.json").exists():
            from datasets import load_from_disk

            return list(rows_from_datasets(load_from_disk(str(path)), str(path), spec.hub_splits[native_split])), f"datasets folder {path}"
        if path.is_dir():
            path = path / spec.local_files[native_split]
        if not path.is_file():
            raise DataError(f"{config.dataset}: {path} does not exist; pass an existing file or data folder")
        return list(rows_from_file(path)), str(path)
    if not spec.local_files:
        raise DataError(f"{config.dataset}: needs an explicit path (--data-path FILE.jsonl)")
    for label, folder in default_data_dirs():
        path = folder / spec.local_files[native_split]
        if path.is_file():
            return list(rows_from_file(path)), str(path)
        tried.append(f"{label}: {path} missing")
    try:
        from datasets import load_dataset

        repo, name = spec.hub
        hub = {s: load_dataset(repo, name, split=s) for s in spec.hub_splits[native_split]}
        return list(rows_from_datasets(hub, repo, spec.hub_splits[native_split])), f"hub {repo}"
    except Exception as e:  # offline, unknown repo, auth: the message below says what was tried
        tried.append(f"hub {spec.hub[0]}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    raise DataError(
        f"{config.dataset}: no source found. Tried: " + "; ".join(tried)
        + ". Fix: pass --data-path, set SFTKEY_DATA_DIR to a folder with the data set, or allow hub access."
    )


def stable_key(seed: int, uid: str) -> int:
    """A pseudo-random but stable number per (seed, record): subsamples and splits do not depend on order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uid}".encode()).digest()[:8], "big")


def load_records(config: DataConfig) -> tuple[list[Record], str]:
    """The records of `config` (split, then seeded subsample, original order kept) and the source used."""
    spec = source_of(config.dataset)
    native = native_splits(config.dataset)
    if config.split in native:
        native_split, carve = config.split, None
    elif len(native) == 1 and config.split in ("train", "test"):
        native_split, carve = native[0], config.split
    else:
        raise DataError(f"{config.dataset}: unknown split {config.split!r}; choose one of {native + ['train', 'test']}")
    rows, source = native_rows(config, native_split)
    if not rows:
        raise DataError(f"{source}: no records (the file is empty or holds only blank lines); "
                        "pass a file with one JSON record per line")
    prefix = f"{config.dataset}-{native_split}"
    records = [spec.convert(row, f"{prefix}-{i:05d}", origin, config) for i, (row, origin) in enumerate(rows)]
    if spec.sort_by_uid:
        records.sort(key=lambda r: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", r.uid)])
    duplicates = len(records) - len({r.uid for r in records})
    if duplicates:
        raise DataError(f"{source}: {duplicates} duplicate record ids; ids must be unique")
    if carve:
        threshold = config.test_fraction * 2**64
        records = [r for r in records if (stable_key(config.seed, "split:" + r.uid) < threshold) == (carve == "test")]
    if not records:
        raise DataError(f"{source}: the {carve} half carved with seed {config.seed} and test_fraction "
                        f"{config.test_fraction} holds no records; use more records or another test_fraction")
    if config.limit is not None and config.limit < len(records):
        keep = set(sorted((r.uid for r in records), key=lambda uid: stable_key(config.seed, uid))[: config.limit])
        records = [r for r in records if r.uid in keep]
    return records, source
