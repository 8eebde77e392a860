"""Production stores: the Dagster instance on PostgreSQL (orchestration/instance.py writes its dagster.yaml, with a
run queue) and MLflow behind `mlflow server` on PostgreSQL with artifacts proxied through it. The real tests start
a real PostgreSQL (tests/pg_server.py; they skip, saying why, where it cannot run) and a real `mlflow server`."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from orchestration.config import DagsterSection, pipeline_config_from_dict
from orchestration.instance import HEADER, HandWrittenInstance, MissingPassword, instance_settings, write_instance_yaml
from orchestration.tracking import redact
from sftkey.config_file import ConfigError
from tests.orchestration.conftest import smoke_raw, write_config

PASSWORD_ENV = "SFTKEY_TEST_PG_PASSWORD"
PG_URL = "postgresql://sftkey@127.0.0.1:5432/dagster"


def config_with(tmp_path: Path, **sections):
    return pipeline_config_from_dict(smoke_raw(Path("/no/model/needed"), tmp_path / "work", **sections))


def postgres_section(url: str) -> dict:
    """`dagster:` on PostgreSQL, its password in $SFTKEY_TEST_PG_PASSWORD."""
    return {"storage": "postgres", "postgres_url": url, "password_env": PASSWORD_ENV}


def parsed_instance_yaml(home: Path) -> dict:
    """dagster.yaml as Dagster itself validates and reads it (its own config schema)."""
    from dagster._core.instance.config import dagster_instance_config

    settings, _ = dagster_instance_config(str(home))
    return dict(settings)


# ------------------------------------------------------------------------------------------ dagster.yaml


def test_default_instance_yaml_is_sqlite_with_a_run_queue_and_no_telemetry(tmp_path):
    home = tmp_path / "dagster"
    path = write_instance_yaml(home, config_with(tmp_path))
    assert path == home / "dagster.yaml" and path.read_text().startswith(HEADER)
    settings = parsed_instance_yaml(home)
    assert "storage" not in settings  # Dagster's default: sqlite files under the home
    assert settings["telemetry"] == {"enabled": False} and settings["nux"] == {"enabled": False}
    assert settings["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert settings["concurrency"] == {"runs": {"max_concurrent_runs": 1}, "pools": {"default_limit": 1}}
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        concurrency = instance.get_concurrency_config()
        assert (concurrency.run_queue_config.max_concurrent_runs, concurrency.pool_config.default_pool_limit) == (1, 1)
    finally:
        instance.dispose()


def test_postgres_instance_yaml_names_the_password_variable_never_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-value")
    config = config_with(tmp_path, dagster={"storage": "postgres", "postgres_url": PG_URL + "?sslmode=disable",
                                            "password_env": PASSWORD_ENV, "max_concurrent_runs": 3})
    path = write_instance_yaml(tmp_path / "dagster", config)
    assert "s3cret-value" not in path.read_text()
    settings = parsed_instance_yaml(tmp_path / "dagster")
    assert settings["storage"] == {"postgres": {"postgres_db": {
        "username": "sftkey", "password": {"env": PASSWORD_ENV}, "hostname": "127.0.0.1", "db_name": "dagster",
        "port": 5432, "params": {"sslmode": "disable"}, "scheme": "postgresql+psycopg2"}}}
    assert settings["concurrency"]["runs"] == {"max_concurrent_runs": 3}


def test_postgres_url_without_password_env_is_left_to_libpq(tmp_path):
    config = config_with(tmp_path, dagster={"storage": "postgres", "postgres_url": PG_URL})
    expected = {"postgres": {"postgres_url": "postgresql+psycopg2://sftkey@127.0.0.1:5432/dagster"}}
    assert instance_settings(config.sections.dagster)["storage"] == expected
    write_instance_yaml(tmp_path / "dagster", config)
    assert parsed_instance_yaml(tmp_path / "dagster")["storage"] == expected


def test_instance_yaml_follows_the_config_and_keeps_a_hand_written_one(tmp_path):
    home = tmp_path / "dagster"
    write_instance_yaml(home, config_with(tmp_path))
    write_instance_yaml(home, config_with(tmp_path, dagster={"max_concurrent_runs": 4}))
    assert parsed_instance_yaml(home)["concurrency"]["runs"] == {"max_concurrent_runs": 4}  # rewritten
    hand_written = "telemetry:\n  enabled: true\n"
    (home / "dagster.yaml").write_text(hand_written)
    write_instance_yaml(home, config_with(tmp_path))  # the default section: the user's file is used as it is
    assert (home / "dagster.yaml").read_text() == hand_written
    with pytest.raises(HandWrittenInstance, match=r"dagster\.yaml was not written by sftkey.*delete the file"):
        write_instance_yaml(home, config_with(tmp_path, dagster={"max_concurrent_runs": 4}))
    assert (home / "dagster.yaml").read_text() == hand_written


def test_the_yaml_sftkey_wrote_before_the_dagster_section_is_replaced(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    write_instance_yaml(home, config_with(tmp_path))
    assert (home / "dagster.yaml").read_text().startswith(HEADER)


def test_missing_password_variable_is_named_before_dagster_opens_the_database(tmp_path, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    config = config_with(tmp_path, dagster=postgres_section(PG_URL))
    with pytest.raises(MissingPassword, match=rf"^dagster\.password_env: \${PASSWORD_ENV} is not set"):
        write_instance_yaml(tmp_path / "dagster", config)
    assert not (tmp_path / "dagster" / "dagster.yaml").exists()


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("sections, message", [
    ({"dagster": {"storage": "postgres"}}, r"dagster\.postgres_url: storage: postgres needs the database"),
    ({"dagster": {"storage": "mysql"}}, r"dagster\.storage: 'mysql': use sqlite or postgres"),
    ({"dagster": {"storage": "postgres", "postgres_url": "sqlite:///x.db"}},
     r"dagster\.postgres_url: .*not a postgresql"),
    ({"dagster": {"storage": "postgres", "postgres_url": "postgresql://u:hunter2@h/db"}},
     r"dagster\.postgres_url: postgresql://u:\*\*\*@h/db holds a password.*dagster\.password_env"),
    ({"dagster": {"password_env": "hunter2!"}}, r"dagster\.password_env: 'hunter2!' is not an environment variable"),
    ({"dagster": {"max_concurrent_runs": -2}}, r"dagster\.max_concurrent_runs: must be >= 0, or -1"),
    ({"tracking": {"tracking_uri": "postgresql://u@h/mlflow"}},
     r"tracking\.tracking_uri: .*serve it: tracking_uri: http://127\.0\.0\.1:5000 and server_backend_store_uri"),
    ({"tracking": {"server_backend_store_uri": "postgresql://u@h/mlflow"}},
     r"tracking\.server_backend_store_uri: `sftkey ui` serves this database on 127\.0\.0\.1"),
    ({"tracking": {"tracking_uri": "http://10.0.0.5:5000", "server_backend_store_uri": "postgresql://u@h/mlflow"}},
     r"tracking\.server_backend_store_uri: `sftkey ui` serves"),
    ({"tracking": {"tracking_uri": "http://127.0.0.1:5000", "server_backend_store_uri": "postgresql://u:pw@h/m"}},
     r"tracking\.server_backend_store_uri: postgresql://u:\*\*\*@h/m holds a password.*tracking\.password_env"),
])
def test_config_refuses_stores_it_cannot_use(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message) as refused:
        config_with(tmp_path, **sections)
    assert "hunter2@" not in str(refused.value) and ":pw@" not in str(refused.value)


def test_default_sections_keep_the_local_stores(tmp_path):
    config = config_with(tmp_path)
    assert config.sections.dagster == DagsterSection()
    assert config.sections.tracking.server_backend_store_uri is None


def test_redact_hides_a_database_password():
    assert redact("postgresql://sftkey:s3cret@db:5432/mlflow") == "postgresql://sftkey:***@db:5432/mlflow"
    assert redact("postgresql://db/mlflow?password=s3cret&sslmode=require") == (
        "postgresql://db/mlflow?password=***&sslmode=require")


# ------------------------------------------------------------------------------------------ sftkey ui


def served_config(tmp_path: Path, backend: str, port: int = 5123, **tracking):
    return config_with(tmp_path, tracking={"tracking_uri": f"http://127.0.0.1:{port}",
                                           "server_backend_store_uri": backend, **tracking})


def test_ui_serves_the_postgres_store_with_proxied_artifacts_on_the_tracking_port(tmp_path):
    from orchestration.ui import mlflow_command

    config = served_config(tmp_path, "postgresql://sftkey@127.0.0.1:5432/mlflow")
    command = mlflow_command(config, port=5000)
    assert command[command.index("server"):] == [
        "server", "--backend-store-uri", "postgresql+psycopg2://sftkey@127.0.0.1:5432/mlflow",
        "--artifacts-destination", (tmp_path / "work" / "mlflow" / "artifacts").as_uri(), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]
    remote = config_with(tmp_path, tracking={"tracking_uri": "http://mlflow.internal:5000"})
    assert mlflow_command(remote, port=5000) is None  # a server that runs elsewhere is not started here


def test_ui_gives_the_server_its_password_only_through_the_environment(tmp_path, monkeypatch):
    from orchestration.ui import MissingPassword as UiMissingPassword, database_password, mlflow_command

    config = served_config(tmp_path, "postgresql://sftkey@127.0.0.1:5432/mlflow", password_env=PASSWORD_ENV)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(UiMissingPassword, match=rf"^tracking\.password_env: \${PASSWORD_ENV} is not set"):
        database_password(config)
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-value")
    assert database_password(config) == {"PGPASSWORD": "s3cret-value"}
    assert "s3cret-value" not in " ".join(mlflow_command(config, port=5000))


# ------------------------------------------------------------------------------------------ real PostgreSQL


def test_dagster_instance_on_postgres_keeps_runs_in_the_database(postgres, tmp_path, monkeypatch):
    from orchestration.pipeline import dagster_instance

    database = postgres.create_database(f"dagster_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    config = config_with(tmp_path, dagster=postgres_section(postgres.url(database)))

    @dg.asset
    def answer() -> int:
        return 42

    instance = dagster_instance(config)
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = dg.materialize([answer], instance=instance, tags={"sftkey.test": "stores"})
        assert result.success
    finally:
        instance.dispose()
    reopened = dg.DagsterInstance.from_config(str(tmp_path / "dagster"))  # a second process would read the same
    try:
        runs = reopened.get_runs(dg.RunsFilter(tags={"sftkey.test": "stores"}))
        assert [(r.run_id, r.status.value) for r in runs] == [(result.run_id, "SUCCESS")]
        assert reopened.get_latest_materialization_event(dg.AssetKey("answer")).run_id == result.run_id
    finally:
        reopened.dispose()
    assert column(postgres, database, "SELECT run_id FROM runs") == {result.run_id}
    assert not list((tmp_path / "dagster").glob("**/*.db"))  # no sqlite store beside it


def column(postgres, database: str, query: str) -> set[str]:
    """The first column of `query`'s rows in `database`, read with plain SQL; empty while the table is missing
    (an instance that has not created its tables yet)."""
    import psycopg2

    connection = psycopg2.connect(postgres.url(database), password=postgres.password)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return {row[0] for row in cursor.fetchall()}
    except psycopg2.errors.UndefinedTable:
        return set()
    finally:
        connection.close()


@pytest.fixture
def mlflow_server(postgres, tmp_path, monkeypatch):
    """A real `mlflow server` as `sftkey ui` starts it (orchestration.ui's command and environment), on its own
    PostgreSQL database with artifacts proxied to tmp_path/served-artifacts; yields (config tracking section, log)."""
    from orchestration import ui
    from tests.pg_server import free_port

    database = postgres.create_database(f"mlflow_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    tracking = {"tracking_uri": f"http://127.0.0.1:{free_port()}", "server_backend_store_uri": postgres.url(database),
                "server_artifacts_destination": (tmp_path / "served-artifacts").as_uri(),
                "password_env": PASSWORD_ENV, "experiment": "stores"}
    config = config_with(tmp_path, tracking=tracking)
    command, env = ui.mlflow_command(config, port=0), ui.service_env(config)
    log_dir = tmp_path / "ui-logs"
    log_dir.mkdir()
    started = time.monotonic()
    service = ui.launch("mlflow", command, tracking["tracking_uri"], "/health", env, log_dir)
    try:
        ui.wait_until_up(service, log_dir)
        print(f"mlflow server on PostgreSQL answered after {time.monotonic() - started:.1f} s "
              f"(PostgreSQL started in {postgres.startup_s:.2f} s)")
        yield tracking, log_dir / "mlflow.log"
    finally:
        ui.stop([service])


@pytest.mark.slow
def test_smoke_pipeline_on_production_stores_reads_its_lineage_back_through_the_server(
        postgres, mlflow_server, tiny_model_dir, shared_data, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from orchestration.pipeline import PIPELINE_RUN_TAG, dagster_instance, run_pipeline
    from orchestration.registry import walk_lineage
    from orchestration.tracking import PARENT_TAG

    tracking, server_log = mlflow_server
    database = postgres.create_database(f"dagster_{uuid.uuid4().hex[:8]}")
    work = tmp_path / "work"
    raw = smoke_raw(tiny_model_dir, work, tracking=tracking,
                    dagster=postgres_section(postgres.url(database)))
    monkeypatch.setenv("DAGSTER_HOME", str(work / "dagster"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from orchestration.config import load_pipeline_config

    config = load_pipeline_config(write_config(raw, tmp_path / "pipeline.yaml"))
    started = time.monotonic()
    result = run_pipeline(config, echo=print, instance=dagster_instance(config))
    print(f"smoke pipeline on PostgreSQL + mlflow server: {time.monotonic() - started:.1f} s")

    # MLflow, through the server only: version -> run -> data set input and parent run; artifacts via its proxy
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    name, version = result.registered["name"], result.registered["version"]
    lineage = walk_lineage(client, name, version)
    assert (lineage.pipeline_run_id, lineage.pipeline_run_name) == (result.parent_run_id, result.pipeline_run)
    run = client.get_run(lineage.run_id)
    assert run.data.tags[PARENT_TAG] == result.parent_run_id
    inputs = [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs]
    assert inputs == [("svamp-train", lineage.data_version[:36])]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    source = client.get_model_version(name, version).source
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "downloaded"),
                                                     tracking_uri=tracking["tracking_uri"]))
    assert (local / "MLmodel").is_file()
    served = Path(tracking["server_artifacts_destination"].removeprefix("file://"))
    assert list(served.rglob("MLmodel"))  # the bytes went through the server into its destination
    assert not (work / "mlflow").exists()  # no local store beside the work dir
    assert postgres.password not in server_log.read_text()

    # Dagster, from the PostgreSQL instance (a fresh instance from the same dagster.yaml)
    instance = dg.DagsterInstance.from_config(str(work / "dagster"))
    try:
        runs = instance.get_runs(dg.RunsFilter(tags={PIPELINE_RUN_TAG: result.pipeline_run}))
        assert runs and {r.status.value for r in runs} == {"SUCCESS"}
        run_ids = {r.run_id for r in runs}
        keys = [k for k in instance.get_asset_keys() if any(part in k.to_user_string()
                                                           for part in ("benchmark_scores", "registered_model"))]
        assert {part for k in keys for part in ("benchmark_scores", "registered_model") if part in k.to_user_string()} \
            == {"benchmark_scores", "registered_model"}
        for key in keys:
            assert instance.get_latest_materialization_event(key).run_id in run_ids, key
    finally:
        instance.dispose()
    assert run_ids <= column(postgres, database, "SELECT run_id FROM runs")
    assert postgres.password not in (work / "dagster" / "dagster.yaml").read_text()


def test_postgres_helper_says_why_when_no_server_binaries_are_found(monkeypatch):
    from tests import pg_server

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(pg_server, "SEARCH_DIRS", [Path("/nonexistent/bin")])
    with pytest.raises(pg_server.PostgresMissing,
                       match=r"initdb, pg_ctl, postgres\) not found.*apt-get install postgresql-15"):
        pg_server.start_postgres()


@pytest.mark.slow
def test_sftkey_ui_runs_the_run_queue_daemon_and_the_mlflow_server_on_postgres(postgres, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    """`sftkey ui` (orchestration.ui.start) on both PostgreSQL stores: `dagster dev` uses the same home, so its
    daemon's queue heartbeats land in the PostgreSQL instance; the MLflow server answers where tracking_uri points."""
    from mlflow import MlflowClient

    from orchestration import ui
    from orchestration.config import load_pipeline_config
    from tests.pg_server import free_port

    dagster_db, mlflow_db = (postgres.create_database(f"{kind}_{uuid.uuid4().hex[:8]}")
                             for kind in ("dagster", "mlflow"))
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    work = tmp_path / "work"
    monkeypatch.setenv("DAGSTER_HOME", str(work / "dagster"))
    tracking_uri = f"http://127.0.0.1:{free_port()}"
    raw = smoke_raw(tiny_model_dir, work, tracking={"tracking_uri": tracking_uri, "password_env": PASSWORD_ENV,
                                                    "server_backend_store_uri": postgres.url(mlflow_db)},
                    dagster=postgres_section(postgres.url(dagster_db)))
    config = load_pipeline_config(write_config(raw, tmp_path / "pipeline.yaml"))
    started = time.monotonic()
    services = ui.start(config, dagster_port=free_port(), mlflow_port=free_port())
    try:
        print(f"sftkey ui on PostgreSQL stores: both answered after {time.monotonic() - started:.1f} s")
        assert {s.name: s.url for s in services}["mlflow"] == tracking_uri
        assert MlflowClient(tracking_uri).search_experiments()[0].name == "Default"
        deadline = time.monotonic() + 60
        heartbeats = "SELECT daemon_type FROM daemon_heartbeats"
        while "QUEUED_RUN_COORDINATOR" not in column(postgres, dagster_db, heartbeats) and time.monotonic() < deadline:
            time.sleep(1)
        assert "QUEUED_RUN_COORDINATOR" in column(postgres, dagster_db, heartbeats)
    finally:
        ui.stop(services)
    logs = "".join(p.read_text(errors="replace") for p in (work / "ui-logs").glob("*.log"))
    assert postgres.password not in logs
