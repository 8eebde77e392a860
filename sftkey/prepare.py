"""Prepare a data set for training: load -> annotate -> render -> tokenize with roles, and write it to disk.
`tokenize_records` is the last two steps alone, for records annotated elsewhere (the pipeline's annotated_dataset).

A prepared folder holds `examples.jsonl` (uid, input_ids, roles), `records.jsonl` (the annotated records),
`exclusions.jsonl` (what was left out and why) and `meta.json` (versions, counts, the config). It is
written to a temporary folder and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftkey.atomic import swap_folder
from sftkey.annotate import Annotated, AnnotationConfig, Exclusion, annotate, exclusion_counts
from sftkey.data import DataConfig, DataError, content_version, load_records
from sftkey.format import render
from sftkey.roles import ROLE_NAMES
from sftkey.tokenize import TokenizedExample, template_gap, tokenize_examples

# A text longer than max_length * this many characters cannot fit max_length tokens (tokens of real vocabularies
# are far shorter), so it is excluded as too long without tokenizing: a 10 MB record would cost gigabytes.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class PrepareConfig:
    """Everything that decides a prepared data set's content."""

    data: DataConfig = field(default_factory=DataConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    tagged: bool = field(default=True, metadata={"help": "tagged template (False: plain worked solution, the SFT arm)"})
    max_length: int = field(default=1024, metadata={"help": "examples with more tokens are excluded, never truncated"})


@dataclass
class Prepared:
    examples: list[TokenizedExample]
    records: list[Annotated]
    exclusions: list[Exclusion]
    meta: dict


def prepare(config: PrepareConfig, tokenizer) -> Prepared:
    """Load, annotate and tokenize the records of `config.data`."""
    records, source = load_records(config.data)
    annotated, exclusions = annotate(config.data.dataset, records, config.annotation)
    return tokenize_records(annotated, exclusions, config, tokenizer, content_version(records), source,
                            origins={r.uid: r.origin for r in records})


def tokenize_records(records: list[Annotated], exclusions: list[Exclusion], config: PrepareConfig, tokenizer,
                     data_version: str, source: str, origins: dict[str, str] | None = None) -> Prepared:
    """Render and tokenize annotated records; the ones over `config.max_length` tokens join the (copied) exclusions.

    `data_version` and `source` describe the loaded records the annotation came from (`exclusions` holds the
    ones annotation left out), so the counts cover every loaded record. `origins` (uid -> `file line N`) names
    where a too-long record came from; without it, the source.
    """
    origins = origins or {}
    exclusions = list(exclusions)
    loaded = len(records) + len(exclusions)
    too_long = f"longer than max_length {config.max_length} tokens"
    items, tokenizable = [], []
    for record in records:
        response = render(record.reasoning, record.answer, config.tagged)
        if len(record.question) + len(response.text) > config.max_length * MAX_CHARS_PER_TOKEN:
            exclusions.append(Exclusion(record.uid, origins.get(record.uid, source), too_long))  # never tokenized: see the constant
        else:
            items.append((record.uid, record.question, response))
            tokenizable.append(record)
    examples = tokenize_examples(tokenizer, items)
    kept_examples, kept_records = [], []
    for example, record in zip(examples, tokenizable):
        if len(example.input_ids) > config.max_length:
            exclusions.append(Exclusion(record.uid, origins.get(record.uid, source), too_long))
        else:
            kept_examples.append(example)
            kept_records.append(record)
    meta = {
        "dataset": config.data.dataset,
        "split": config.data.split,
        "source": source,
        "data_version": data_version,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "template_gap": template_gap(tokenizer),  # chat-template text between generation prompt and response
        "config": asdict(config),
        "counts": {"records": loaded, "kept": len(kept_examples), "excluded": len(exclusions)},
        "exclusions_by_reason": exclusion_counts(exclusions),
        "tokens_by_role": token_counts(kept_examples),
    }
    meta["answer_token_share"] = answer_token_share(meta["tokens_by_role"])
    return Prepared(kept_examples, kept_records, exclusions, meta)


def token_counts(examples: list[TokenizedExample]) -> dict[str, int]:
    counts = Counter()
    for example in examples:
        counts.update(example.roles)
    return {name: counts.get(role, 0) for role, name in enumerate(ROLE_NAMES)}


def answer_token_share(tokens_by_role: dict[str, int]) -> float:
    """Answer tokens over response tokens (thinking + answer + eos): how little of the loss stage 2 keeps."""
    response = tokens_by_role["thinking"] + tokens_by_role["answer"] + tokens_by_role["eos"]
    return tokens_by_role["answer"] / response if response else 0.0


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_prepared(prepared: Prepared, out: Path) -> Path:
    """Write to a temp folder beside `out`, then swap it in (an existing `out` is replaced only at the end)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        _write_jsonl(tmp / "examples.jsonl", (asdict(e) for e in prepared.examples))
        _write_jsonl(tmp / "records.jsonl", (asdict(r) for r in prepared.records))
        _write_jsonl(tmp / "exclusions.jsonl", (asdict(e) for e in prepared.exclusions))
        (tmp / "meta.json").write_text(json.dumps(prepared.meta, indent=2, ensure_ascii=False) + "\n")
        swap_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


PREPARED_FILES = ("examples.jsonl", "records.jsonl", "exclusions.jsonl", "meta.json")


def read_prepared(folder: Path) -> Prepared:
    """A folder written by `write_prepared`; anything else is a DataError naming the folder or file."""
    folder = Path(folder)
    missing = [name for name in PREPARED_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} is not a prepared data set (no {', '.join(missing)}); "
                        f"write one with `sftkey prepare --out {folder}`")

    def rows(name, cls):
        with open(folder / name, encoding="utf-8") as f:
            return [_row(cls, line, folder / name, number) for number, line in enumerate(f, start=1)]

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return Prepared(rows("examples.jsonl", TokenizedExample), rows("records.jsonl", Annotated),
                        rows("exclusions.jsonl", Exclusion), meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{folder}: a file of the prepared set is damaged ({e}); "
                        f"write it again with `sftkey prepare --out {folder}`") from None


def _row(cls, line: str, path: Path, number: int):
    try:
        return cls(**json.loads(line))
    except TypeError:  # a row with other fields: another program's file, or a damaged one
        raise DataError(f"{path} line {number}: not a {cls.__name__} row; "
                        "write the set again with `sftkey prepare`") from None


def summary_lines(meta: dict) -> list[str]:
    """The human summary `sftkey prepare` prints."""
    counts, tokens = meta["counts"], meta["tokens_by_role"]
    lines = [
        f"{meta['dataset']} [{meta['split']}] from {meta['source']}",
        f"records {counts['records']}, kept {counts['kept']}, excluded {counts['excluded']}",
    ]
    lines += [f"  excluded: {n} x {reason}" for reason, n in meta["exclusions_by_reason"].items()]
    lines.append("tokens by role: " + ", ".join(f"{name} {n:,}" for name, n in tokens.items()))
    lines.append(f"answer-token share of response tokens: {meta['answer_token_share']:.2%}")
    lines.append(f"data version {meta['data_version'][:16]}")
    if meta.get("template_gap"):  # folders prepared before the field have none
        lines.append(f"chat template inserts {meta['template_gap']!r} before each response: it is part of the "
                     "prompt in training and evaluation")
    return lines
