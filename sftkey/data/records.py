"""The canonical record every source yields, its content version, and strict readers for JSON/JSONL files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from sftkey.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the line and the fix."""


# A jsonl line longer than this is an error, not a record: prepare excludes over-long records by their length
# (sftkey.prepare.MAX_CHARS_PER_TOKEN) without tokenizing them, but the reader still has to hold the line.
MAX_LINE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Record:
    """One question with its worked solution, identical whichever source it came from.

    solution: the data set's worked solution (GSM8K: with `#### N`; MATH: with `\\boxed{}`; SVAMP: the equation).
    answer: the gold final answer where the source states it separately, else None (annotation derives it).
    origin: `file:line` (or `hub:repo[split]#i`) for error messages; not part of the content.
    """

    uid: str
    question: str
    solution: str
    answer: str | None = None
    origin: str = ""

    def canonical(self) -> dict:
        content = asdict(self)
        del content["origin"]
        return content


def content_version(records: list[Record]) -> str:
    """sha256 over the canonical records in order: the same data gives the same version on any machine."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.canonical(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the line."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:  # not a record; refuse before parsing (or holding) more of it
                raise DataError(f"{path} line {number}: longer than {MAX_LINE_BYTES // 2**20} MiB, far beyond any "
                                "record; remove or split that line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} line {number}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {number}: invalid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def read_json_list(path: Path) -> list[dict]:
    """A JSON file holding a list of objects (SVAMP's format)."""
    try:
        items = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    return items


def require(obj: dict, field: str, origin: str, numbers: bool = True) -> str:
    """A text field of a raw row, or an error naming the row and the field.

    `numbers`: a JSON number is accepted as its text (answers such as 42); an object, a list or true/false never.
    """
    if field not in obj:
        raise DataError(f"{origin}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if value is None or isinstance(value, str):
        return value or ""
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = {dict: "a JSON object", list: "a JSON list", bool: "true/false"}.get(type(value), "a number")
    raise DataError(f"{origin}: field {field!r} is {kind}, expected text; write it as a JSON string")
