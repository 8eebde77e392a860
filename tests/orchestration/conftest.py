"""Fixtures for the orchestration tests: the smoke pipeline (configs/pipeline_smoke.yaml) on the tiny model, run
once per session into a temp folder with a real sqlite MLflow store, a real DVC repo and a Dagster instance."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = PROJECT / "configs" / "pipeline_smoke.yaml"


def smoke_raw(tiny_model_dir: Path, work_dir: Path, **sections) -> dict:
    """configs/pipeline_smoke.yaml as a dict, on the session's tiny model, in `work_dir`, sections replaced."""
    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["work_dir"] = str(work_dir)
    raw["training"]["model"] = str(tiny_model_dir)
    for key, value in sections.items():
        raw[key] = copy.deepcopy(value)
    return raw


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class SmokeRun:
    raw: dict
    config_path: Path
    config: object  # orchestration.config.PipelineConfig
    result: object  # orchestration.pipeline.PipelineResult
    instance: object  # dagster.DagsterInstance
    lines: list[str]


@pytest.fixture(scope="session")
def smoke_run(tiny_model_dir, tmp_path_factory, shared_data) -> SmokeRun:
    import dagster as dg

    from orchestration.config import load_pipeline_config
    from orchestration.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("smoke")
    raw = smoke_raw(tiny_model_dir, work / "work")
    path = write_config(raw, work / "pipeline_smoke.yaml")
    config = load_pipeline_config(path)
    (work / "work" / "dagster").mkdir(parents=True)
    instance = dg.DagsterInstance.local_temp(str(work / "work" / "dagster"))
    lines: list[str] = []
    result = run_pipeline(config, echo=lines.append, instance=instance)
    return SmokeRun(raw, path, config, result, instance, lines)
