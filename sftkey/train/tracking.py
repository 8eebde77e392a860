"""What the trainer reports, through a small Protocol: params, per-step metrics, tags and artifacts.

The library ships a no-op tracker and a JSONL one (the run's `metrics.jsonl`); an MLflow tracker belongs to the
orchestration layer, so the library never imports mlflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from sftkey.atomic import write_text


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


class JsonlTracker:
    """One JSON object per line, appended and flushed at once, so a crash loses at most the line being written.

    Metrics lines carry the current tags (arm, seed, stage): `{"type": "metrics", "step": 3, "stage": "stage1", "loss": ...}`.
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
        self._write({"type": "metrics", "step": step, **self.tags, **metrics})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path) -> None:
        self._write({"type": "artifact", **self.tags, "path": str(path)})

    def drop_metrics_after(self, step: int) -> None:
        """Forget metrics lines past `step` (a resumed run logs those steps again); rewritten via a temp file."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not _is_metrics_after(json.loads(line), step)]
        write_text(self.path, "".join(kept))


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


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics lines of a `metrics.jsonl`, in order."""
    with open(path, encoding="utf-8") as f:
        return [row for row in map(json.loads, f) if row.get("type") == "metrics"]
