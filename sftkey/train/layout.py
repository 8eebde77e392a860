"""Where a training run keeps its files: the one description of the run layout (no torch).

    {output_dir}/{arm}/seed{seed}/        run_folder(output_dir, arm, seed)
        config.yaml                       the resolved config (rerun with --resume)
        metrics.jsonl                     one line per optimizer step (sftkey.train.tracking)
        run.json                          status, stages, final checkpoint, base model
        run.lock                          the flock of the process training it
        checkpoints/<name>/               periodic `step-XXXXXXXX/` and `<stage>-final/` (sftkey.train.checkpoint)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftkey.train import checkpoint as ckpt
from sftkey.train.tracking import read_metrics

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class RunPaths:
    """The files of one arm x seed run."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.root / RUN_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE


def run_folder(output_dir: str | Path, arm: str, seed: int) -> RunPaths:
    return RunPaths(Path(output_dir) / arm / f"seed{seed}")


def run_root(checkpoint: Path) -> Path:
    """The arm x seed run folder a checkpoint (`<run>/checkpoints/<name>`) belongs to."""
    return Path(checkpoint).parent.parent


def metrics_path(checkpoint: Path) -> Path:
    """The trainer's log of the run that wrote `checkpoint`."""
    return run_root(checkpoint) / METRICS_FILE


def stage_metrics(checkpoint: Path, stage: str) -> list[dict]:
    """The trainer's per-step log rows of `stage` in the run of `checkpoint`; [] when none."""
    path = metrics_path(checkpoint)
    return [row for row in read_metrics(path) if row.get("stage") == stage] if path.is_file() else []


def finished_stage(folder: Path, seed: int, key: str) -> Path | None:
    """A final checkpoint with stage key `key` under a store folder (runs of any arm), ready to reuse:
    SFTKey-Tag's stage 1 is SFT-Tag's."""
    pattern = f"*/seed{seed}/{CHECKPOINTS_DIR}/*{ckpt.FINAL_SUFFIX}/{ckpt.META_FILE}"
    for meta_file in sorted(Path(folder).glob(pattern)):
        meta = ckpt.read_meta(meta_file.parent)
        if meta and meta.get("stage_key") == key:
            return meta_file.parent
    return None
