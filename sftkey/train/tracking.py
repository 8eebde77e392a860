"""What the trainer reports, through a small Protocol: params, per-step metrics, tags and artifacts.

The library ships a no-op tracker and a JSONL one (the run's `metrics.jsonl`); an MLflow tracker belongs to the
orchestration layer, so the library never imports mlflow. A tracker may also have `start_stage(stage, steps, offset,
start)`, told before a stage's first step (NullTracker's is the default): enough to show "step 12/40" and an ETA.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from sftkey.atomic import write_text
from sftkey.errors import UserError


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path) -> None: ...


class NullTracker:
    """Reports nothing (the default, and what non-main processes use)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def start_stage(self, stage: str, steps: int, offset: int, start: int) -> None:
        """Stage `stage` runs its steps start+1..steps, logged as global steps offset+start+1..offset+steps."""


class JsonlTracker:
    """One JSON object per line, appended and flushed at once, so a crash loses at most the line being written.

    Metrics lines carry the wall-clock time (unix seconds) and the current tags (arm, seed, stage):
    `{"type": "metrics", "step": 3, "time": 1767225600.123, "stage": "stage1", "loss": ...}`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tags: dict[str, str] = {}

    def _write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"type": "params", **self.tags, "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"type": "metrics", "step": step, "time": round(time.time(), 3), **self.tags, **metrics})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path) -> None:
        self._write({"type": "artifact", **self.tags, "path": str(path)})

    def start_stage(self, stage: str, steps: int, offset: int, start: int) -> None:
        pass  # the stage's steps are in the params line

    def drop_metrics_after(self, step: int) -> list[str]:
        """Forget metrics lines past `step` (a resumed run logs those steps again) and a last line cut by a crash;
        rewritten via a temp file. Returns what was dropped, in words, for the log."""
        if not self.path.exists():
            return []
        rows, cut = _parse_lines(self.path)
        kept = [line for line, row in rows if not _is_metrics_after(row, step)]
        dropped = [f"{self.path}: dropped a last line cut by a crash ({len(cut.encode())} bytes)"] if cut else []
        if len(kept) < len(rows):
            dropped.append(f"{self.path}: dropped {len(rows) - len(kept)} metrics lines past step {step} "
                           "(logged again by this run)")
        if dropped:
            write_text(self.path, "".join(kept))
        return dropped


class MetricsFileError(UserError):
    """A metrics.jsonl line other than the last does not parse: not a crash of ours, so nothing is guessed."""


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict]], str]:
    """(line, row) for each complete line, and the text of a last line a crash cut ("" when there is none).

    Lines are appended whole and end in a newline, so only the last can be cut; a bad line elsewhere is an error.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if number == len(lines):
                return rows, line
            raise MetricsFileError(f"{path} line {number}: not a JSON object; only a crash's last line is repaired, "
                                   "so fix or delete this line (or the file) and resume again")
        rows.append((line, row))
    return rows, ""


def _is_metrics_after(row: dict, step: int) -> bool:
    return row.get("type") == "metrics" and row["step"] > step


class FanoutTracker:
    """Reports to several trackers (the run's JSONL file and, say, MLflow)."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def log_artifact(self, path: str | Path) -> None:
        for t in self.trackers:
            t.log_artifact(path)

    def start_stage(self, stage: str, steps: int, offset: int, start: int) -> None:
        for t in self.trackers:
            if hasattr(t, "start_stage"):  # optional: a tracker of the four Protocol methods still works
                t.start_stage(stage, steps, offset, start)


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics lines of a `metrics.jsonl`, in order (a last line cut by a crash is left out)."""
    rows, _cut = _parse_lines(Path(path))
    return [row for _line, row in rows if row.get("type") == "metrics"]
