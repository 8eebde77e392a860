"""Fixtures for the orchestration tests: the smoke pipeline (configs/pipeline_smoke.yaml) on the tiny model, run
once per session into a temp folder with a real sqlite MLflow store, a real DVC repo and a Dagster instance; and
fresh MLflow stores copied from one migrated per session (MLflow's schema migrations take seconds per store)."""

from __future__ import annotations

import contextlib
import copy
import json
import sqlite3
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


def seed_mlflow_store(template: Path, database: Path) -> Path:
    """`database` becomes a copy of the migrated empty store `template` (sqlite's backup: a consistent copy)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(template)) as source, contextlib.closing(sqlite3.connect(database)) as to:
        source.backup(to)
    return database


def log_served_model(client, experiment_id: str, weights: Path) -> tuple[str, str]:
    """A logged model holding the model folder `weights` where a chat pyfunc model keeps them
    (orchestration.served_weights.WEIGHTS_PATH), for the gate to read back; returns its `models:/` uri and the
    parameters_sha256 a benchmark of those weights records."""
    from orchestration.served_weights import WEIGHTS_PATH
    from sftkey.models import load_model
    from sftkey.weights_digest import parameters_sha256

    run = client.create_run(experiment_id).info.run_id
    model = client.create_logged_model(experiment_id, name="served", source_run_id=run)
    client.log_model_artifacts(model.model_id, str(weights), WEIGHTS_PATH)
    return f"models:/{model.model_id}", parameters_sha256(load_model(weights, dtype="auto"))


def log_benchmark_summary(client, run_id: str, folder: Path, parameters_sha256: str | None) -> None:
    """The benchmark run's summary.json as the gate reads it: only the hash of the parameters it scored (none when
    None, as a summary written before the hash was recorded)."""
    from sftkey.evaluate import SUMMARY

    folder.mkdir(parents=True, exist_ok=True)
    summary = {} if parameters_sha256 is None else {"parameters_sha256": parameters_sha256}
    (folder / SUMMARY).write_text(json.dumps(summary))
    client.log_artifact(run_id, str(folder / SUMMARY))


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with every migration applied (tracking and registry tables), made once."""
    from orchestration.tracking import open_client

    database = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    open_client(f"sqlite:///{database}")
    return database


@pytest.fixture
def mlflow_db(mlflow_template, tmp_path) -> Path:
    """This test's own empty, migrated MLflow store at tmp_path/mlflow/mlflow.db (where a work dir keeps it)."""
    return seed_mlflow_store(mlflow_template, tmp_path / "mlflow" / "mlflow.db")


@dataclass
class SmokeRun:
    raw: dict
    config_path: Path
    config: object  # orchestration.config.PipelineConfig
    result: object  # orchestration.pipeline.PipelineResult
    instance: object  # dagster.DagsterInstance
    lines: list[str]


@pytest.fixture(scope="session")
def smoke_run(tiny_model_dir, tmp_path_factory, shared_data, mlflow_template) -> SmokeRun:
    import dagster as dg

    from orchestration.config import load_pipeline_config
    from orchestration.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("smoke")
    raw = smoke_raw(tiny_model_dir, work / "work")
    path = write_config(raw, work / "pipeline_smoke.yaml")
    config = load_pipeline_config(path)
    seed_mlflow_store(mlflow_template, work / "work" / "mlflow" / "mlflow.db")  # where the default tracking_uri points
    (work / "work" / "dagster").mkdir(parents=True)
    instance = dg.DagsterInstance.local_temp(str(work / "work" / "dagster"))
    lines: list[str] = []
    result = run_pipeline(config, echo=lines.append, instance=instance)
    return SmokeRun(raw, path, config, result, instance, lines)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/pg_server.py); skips, saying why, where none can run."""
    from tests.pg_server import PostgresMissing, start_postgres

    try:
        server = start_postgres()
    except PostgresMissing as missing:
        pytest.skip(f"no PostgreSQL: {missing}")
    try:
        yield server
    finally:
        server.stop()
