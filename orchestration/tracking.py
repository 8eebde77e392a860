"""MLflow tracking as a Dagster resource: one MLflow run per asset materialization, nested under one parent
run per pipeline run.

Not dagster-mlflow: it opens one process-wide run and never ends it, so a second materialization in the same
process fails (../shared/notes/stack.md). Here every run is opened and closed explicitly by id through
`MlflowClient`, so several materializations (and several pipeline runs) in one process never share state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import dagster as dg
from filelock import FileLock
from pydantic import PrivateAttr

from sftkey.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under this parent
DAGSTER_RUN_TAG = "dagster.run_id"
PIPELINE_RUN_TAG = "sftkey.pipeline_run"  # set on the parent run: one per pipeline run
ASSET_TAG = "dagster.asset"
PARTITION_TAG = "dagster.partition"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value; longer ones are logged as a JSON artifact instead


class TrackingUnavailable(UserError, RuntimeError):
    """The MLflow tracking store cannot be reached; raised before any training starts."""


def metric_name(name: str) -> str:
    """MLflow refuses commas in metric names (lm-eval's `exact_match,strict-match`): `exact_match/strict-match`."""
    return name.replace(",", "/")


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "2e-05", ...}: MLflow params are flat strings."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return flat


def probe(tracking_uri: str, timeout_s: float) -> str | None:
    """None when the store answers; otherwise why not (a short reason for the error message)."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
                return None if reply.status == 200 else f"/health answered HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as error:
            return str(getattr(error, "reason", error))
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot create {folder}: {error.strerror}"
        return None if os.access(folder, os.W_OK) else f"{folder} is not writable"
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as error:  # any backend, any failure: the caller turns it into one clear message
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return None


def open_client(tracking_uri: str) -> "MlflowClient":
    """A client whose stores are initialised; a new sqlite database is created by one process at a time
    (two pipeline runs starting at once would otherwise both run its migrations and collide)."""
    import mlflow

    lock = (Path(tracking_uri.removeprefix("sqlite:///") + ".lock") if tracking_uri.startswith("sqlite:///")
            else None)
    with FileLock(str(lock)) if lock else contextlib.nullcontext():
        client = mlflow.MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)  # the tracking store creates or migrates the tables here
        client.search_registered_models(max_results=1)  # and the registry store here
    return client


def default_artifact_location(tracking_uri: str) -> str | None:
    """Beside a sqlite store: `<db folder>/artifacts` (never ./mlruns of whatever folder the user is in)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


class MlflowTracker:
    """The library's tracker Protocol (log_params / log_metrics / log_artifact) writing to one MLflow run."""

    def __init__(self, client: "MlflowClient", run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        long = {k: v for k, v in flat.items() if len(v) > MAX_PARAM_LENGTH}
        short = [Param(k, v) for k, v in flat.items() if k not in long]
        for start in range(0, len(short), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=short[start : start + 100])
        if long:
            self.log_dict(long, "params_too_long.json")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_metric_rows([(step or 0, metrics)])

    def log_metric_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Many steps' metrics in few calls (each call is a database commit): a training log replayed at once.
        Non-numeric and non-finite values are left out (MLflow stores no NaN)."""
        from mlflow.entities import Metric

        stamp = _now_ms()
        batch = [Metric(metric_name(k), float(v), stamp, step) for step, metrics in rows for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(batch), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, content: Any, name: str) -> None:
        """A JSON artifact written from memory (through a temp folder: log_artifact needs a file)."""
        with tempfile.TemporaryDirectory(prefix="sftkey-mlflow-") as tmp:
            file = Path(tmp) / name
            file.write_text(json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n")
            self.client.log_artifact(self.run_id, str(file))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_model(self, folder: str | os.PathLike, name: str = "model") -> str:
        """Log a save_pretrained folder as an MLflow transformers model; returns its `models:/` uri."""
        import logging

        import mlflow

        mlflow.set_tracking_uri(self.client.tracking_uri)
        quiet = logging.getLogger("mlflow.transformers")  # warns that a local folder has no hub model card
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with mlflow.start_run(run_id=self.run_id):  # log_model only knows the fluent API's active run
                info = mlflow.transformers.log_model(
                    transformers_model=str(folder), name=name, task="text-generation",
                    pip_requirements=model_requirements(),  # inferring them imports torchvision, which is absent
                )
        finally:
            quiet.setLevel(level)
        return info.model_uri


def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to the versions that wrote it."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}"
            for package in ("torch", "transformers", "tokenizers", "accelerate", "safetensors")]


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


class MlflowResource(dg.ConfigurableResource):
    """Where runs, metrics, artifacts and the model registry live."""

    tracking_uri: str = "sqlite:///.sftkey-work/mlflow/mlflow.db"
    experiment: str = "sftkey"
    artifact_location: str | None = None  # default: beside a sqlite store (see default_artifact_location)
    parent_run_id: str | None = None  # the pipeline run's parent run; None: one parent per Dagster run
    fallback_tracking_uri: str | None = None  # used, with a warning, when tracking_uri does not answer
    ui_url: str = "http://127.0.0.1:5000"  # the MLflow UI that `sftkey ui` starts; for links in Dagster metadata
    timeout_s: float = 5.0

    _resolved_uri: str | None = PrivateAttr(default=None)
    _client: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every run checks the store when it starts, so an unreachable server fails a run before training.
        self.resolve_uri(context.log)

    def resolve_uri(self, log=None) -> str:
        """The store to use: `tracking_uri`, else the fallback; TrackingUnavailable when neither answers."""
        if self._resolved_uri:
            return self._resolved_uri
        why = probe(self.tracking_uri, self.timeout_s)
        if why is None:
            self._resolved_uri = self.tracking_uri
        elif self.fallback_tracking_uri and probe(self.fallback_tracking_uri, self.timeout_s) is None:
            if log:
                log.warning(f"MLflow at {self.tracking_uri} did not answer ({why}); "
                            f"tracking to {self.fallback_tracking_uri} instead")
            self._resolved_uri = self.fallback_tracking_uri
        else:
            raise TrackingUnavailable(
                f"MLflow tracking store {self.tracking_uri} did not answer ({why}). Nothing was trained. "
                "Start it (`sftkey ui` starts one on 127.0.0.1:5000), point tracking.tracking_uri at a running "
                "server, or set tracking.fallback_tracking_uri (e.g. sqlite:///.sftkey-work/mlflow/mlflow.db) "
                "to track locally when it is down."
            )
        return self._resolved_uri

    def client(self) -> "MlflowClient":
        import mlflow

        # Also the process default: MLflow's registry looks logged models up through a default client
        # (create_model_version of a `models:/m-...` source), and log_model uses the fluent API.
        uri = self.resolve_uri()
        mlflow.set_tracking_uri(uri)
        if self._client is None:
            self._client = open_client(uri)
        return self._client

    def experiment_id(self) -> str:
        """The experiment's id, created with an explicit artifact location the first time."""
        client = self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found:
            return found.experiment_id
        location = self.artifact_location or default_artifact_location(self.resolve_uri())
        try:
            return client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # another process created it between our look-up and create
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start_pipeline_run(self, name: str, tags: dict[str, str] | None = None) -> str:
        """A parent run for one pipeline run; its id goes into `parent_run_id` of every asset's resource."""
        run = self.client().create_run(self.experiment_id(), run_name=name,
                                       tags={PIPELINE_RUN_TAG: name, **(tags or {})})
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client().set_terminated(run_id, status)

    def parent_for(self, dagster_run_id: str) -> str:
        """The configured parent, or the parent run of this Dagster run (created by its first asset)."""
        if self.parent_run_id:
            return self.parent_run_id
        client = self.client()
        found = client.search_runs([self.experiment_id()], f"tags.`{PIPELINE_RUN_TAG}` = '{dagster_run_id}'",
                                   max_results=1)
        if found:
            return found[0].info.run_id
        return self.start_pipeline_run(dagster_run_id, {DAGSTER_RUN_TAG: dagster_run_id})

    @contextlib.contextmanager
    def asset_run(self, context: dg.AssetExecutionContext, tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
        """One MLflow run for this materialization, FINISHED on success and FAILED when the asset raises."""
        client = self.client()
        asset = context.asset_key.to_user_string()
        partition = context.partition_key if context.has_partition_key else None
        dagster_run = context.run.run_id
        run_tags = {PARENT_TAG: self.parent_for(dagster_run), DAGSTER_RUN_TAG: dagster_run, ASSET_TAG: asset,
                    **({PARTITION_TAG: str(partition)} if partition else {}), **(tags or {})}
        run_name = f"{asset}[{partition}]" if partition else asset
        run = client.create_run(self.experiment_id(), run_name=run_name, tags=run_tags)
        tracker = MlflowTracker(client, run.info.run_id)
        try:
            yield tracker
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}/runs/{run_id}"
