"""MLflow tracking as a Dagster resource: one MLflow run per asset materialization, nested under one parent
run per pipeline run.

Not dagster-mlflow: it opens one process-wide run and never ends it, so a second materialization in the same
process fails (../shared/notes/stack.md). Here every run is opened and closed explicitly by id through
`MlflowClient`, so several materializations (and several pipeline runs) in one process never share state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import dagster as dg
from filelock import FileLock, Timeout
from pydantic import PrivateAttr

import sftkey
from sftkey.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under this parent
DAGSTER_RUN_TAG = "dagster.run_id"
PIPELINE_RUN_TAG = "sftkey.pipeline_run"  # set on the parent run: one per pipeline run
ASSET_TAG = "dagster.asset"
CELL_TAG = "sftkey.cell"  # arm|seed of a cell asset's run
PID_TAG = "sftkey.pid"  # the process writing a run, and its host: a later pipeline reaps runs whose process is gone
HOST_TAG = "sftkey.host"
REAPED_TAG = "sftkey.reaped"
WEIGHTS_DTYPE_TAG = "sftkey.weights_dtype"  # of a logged model: the dtype its stored weights are in
LOCK_TIMEOUT_S = 60.0  # creating or migrating a new sqlite store takes seconds; never wait forever on its lock
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what the MLflow 3 UI reads to pick its GenAI or model-training view
MODEL_TRAINING = "custom_model_development"  # shown as "Model training"
DATASET_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest: a data version (sha256 hex) is cut to its prefix
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


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret", "key", "credential", "auth", "signature")
REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]*)(?P<password>:[^\s/@]*)?@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:[^\s=&#]*(?:%s)[^\s=&#]*)=)[^\s&#]*" % "|".join(SECRET_QUERY_KEYS),
                           re.IGNORECASE)


def redact(uri: str) -> str:
    """`uri` (or any text holding URIs) with its credentials replaced by ***: the password of `user:pw@host`,
    a lone `token@host` (a user name alone is often a token) and the values of password/token/... query keys."""

    def userinfo(match: re.Match) -> str:
        user = f"{match['user']}:" if match["password"] else ""
        return f"{match['scheme']}{user}{REDACTED}@"

    return _SECRET_QUERY.sub(lambda m: m["key"] + REDACTED, _USERINFO.sub(userinfo, uri))


def redact_values(value: Any) -> Any:
    """Every string inside a nested dict/list redacted (a config about to be logged)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


def probe(tracking_uri: str, timeout_s: float) -> str | None:
    """None when the store is usable; otherwise what is wrong, completing "MLflow tracking store X ..."."""
    if tracking_uri.startswith(("http://", "https://")):
        return _probe_server(tracking_uri.rstrip("/"), timeout_s)
    if tracking_uri.startswith("sqlite:///"):
        return _probe_sqlite(Path(tracking_uri.removeprefix("sqlite:///")))
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as error:  # any backend, any failure: the caller turns it into one clear message
        return f"did not answer ({type(error).__name__}: {redact(str(error).splitlines()[0][:200] if str(error) else '')})"
    return None


SEARCH_ENDPOINT = "/api/2.0/mlflow/experiments/search?max_results=1"


def _probe_server(base: str, timeout_s: float) -> str | None:
    """A server that answers is MLflow only when its REST API answers with JSON (an HTML page or a 404 is not)."""
    try:
        with urllib.request.urlopen(_authorized(base + SEARCH_ENDPOINT), timeout=timeout_s) as reply:
            body, kind = reply.read(1_000_000), reply.headers.get_content_type()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return f"refused the request (HTTP {error.code}): set MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN"
        return f"answered, but not as an MLflow server (GET {SEARCH_ENDPOINT}: HTTP {error.code})"
    except (urllib.error.URLError, OSError) as error:
        return f"did not answer ({redact(str(getattr(error, 'reason', error)))})"
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if kind != "application/json" or not isinstance(parsed, dict):
        return f"answered, but not as an MLflow server (GET {SEARCH_ENDPOINT}: {kind}, not MLflow's JSON)"
    return None


def _authorized(url: str) -> urllib.request.Request:
    """A request as MLflow's client sends it: credentials from the URL's user:password (which urllib would take
    for part of the host) or from MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, as an Authorization header."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = ({"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user
               else {"Authorization": f"Bearer {token}"} if token else {})
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), headers=headers)


def _probe_sqlite(database: Path) -> str | None:
    """The database's folder must take a new file and an existing database must open for writing: checked
    here, because sqlite and the lock beside it would otherwise wait forever on a path they cannot write."""
    folder = database.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sftkey-probe-"):
            pass
        if database.exists():
            with open(database, "r+b"):
                pass
    except OSError as error:
        where = error.filename or folder
        return f"is not writable ({where}: {error.strerror or error}); point tracking.tracking_uri at a writable path"
    return None


def open_client(tracking_uri: str) -> "MlflowClient":
    """A client whose stores are initialised; a new sqlite database is created by one process at a time
    (two pipeline runs starting at once would otherwise both run its migrations and collide)."""
    import mlflow

    lock = (Path(tracking_uri.removeprefix("sqlite:///") + ".lock") if tracking_uri.startswith("sqlite:///")
            else None)
    try:
        with FileLock(str(lock), timeout=LOCK_TIMEOUT_S) if lock else contextlib.nullcontext():
            client = mlflow.MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)  # the tracking store creates or migrates the tables here
            client.search_registered_models(max_results=1)  # and the registry store here
    except Timeout:
        raise TrackingUnavailable(f"MLflow tracking store {redact(tracking_uri)}: {lock} stayed locked for "
                                  f"{LOCK_TIMEOUT_S:.0f} s; another process is creating the database, or left the "
                                  f"lock behind: retry, or delete {lock} when no sftkey process runs") from None
    return client


def context_tags() -> dict[str, str]:
    """MLflow's own run context (user, source name and type, git commit/branch/repo), as `mlflow.start_run` sets
    it. MLflow reads git from the entry script, which is in the ignored .venv for `sftkey`, `dagster` and pytest:
    then the git facts of this project's checkout are used."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = resolve_tags()
    return tags if MLFLOW_GIT_COMMIT in tags else {**tags, **_project_git_tags()}


@functools.lru_cache(maxsize=1)  # a git call per run would cost more than the run
def _project_git_tags() -> dict[str, str]:
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    project = str(Path(__file__).resolve().parent)
    found = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(project), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(project),
             MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(project)}
    return {k: v for k, v in found.items() if v}


def owner_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still exists (a zombie counts as gone: it will never end its runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): os.kill said it exists
        return True


def is_interrupt(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, as Python or Dagster delivers it inside a step (a killed run, not a failed one)."""
    return isinstance(error, KeyboardInterrupt) or type(error).__name__ in INTERRUPT_ERRORS


INTERRUPT_ERRORS = ("DagsterExecutionInterruptedError", "PipelineInterrupt")


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

    def log_timed_metric_rows(self, rows: list[tuple[int, int, dict[str, float]]]) -> None:
        """(step, timestamp in ms, metrics) rows, each step at its own time: a step as it ends, or a training log
        replayed at the times it recorded. Non-numeric and non-finite values are left out."""
        from mlflow.entities import Metric

        batch = [Metric(metric_name(k), float(v), stamp, step) for step, stamp, metrics in rows
                 for k, v in metrics.items()
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

    def log_input(self, name: str, digest: str, source: str, context: str) -> None:
        """The data set as an MLflow dataset input of this run: `digest` is its data version, `source` a path
        (a DVC `path@rev` too) or URL, `context` "training" or "evaluation" (the UI's dataset context tag)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local path matches two registered source kinds; MLflow picks one
            warnings.simplefilter("ignore")
            dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest[:DATASET_DIGEST_CHARS])
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                          [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_model(self, checkpoint: str | os.PathLike, name: str, dtype: str = "float32",
                  max_new_tokens: int | None = None) -> str:
        """Log a checkpoint as a chat pyfunc model called `name` (e.g. "sft_tag-seed0"): weights in `dtype` (the
        dtype its benchmark scores it in, so that the model served is the model scored; recorded as the logged
        model's WEIGHTS_DTYPE_TAG), config and tokenizer only (no optimizer, scheduler or RNG state).
        `max_new_tokens`: the served generation cap (default chat_model.DEFAULT_MAX_NEW_TOKENS). Returns its
        `models:/<model id>` uri."""
        import mlflow

        from orchestration import chat_model

        mlflow.set_tracking_uri(self.client.tracking_uri)
        with tempfile.TemporaryDirectory(prefix="sftkey-model-") as tmp:
            weights = export_weights(Path(checkpoint), Path(tmp) / chat_model.WEIGHTS_ARTIFACT, dtype)
            with mlflow.start_run(run_id=self.run_id):  # log_model only knows the fluent API's active run
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=chat_model.__file__, artifacts={chat_model.WEIGHTS_ARTIFACT: str(weights)},
                    code_paths=[str(Path(sftkey.__file__).parent)],
                    model_config={"max_new_tokens": max_new_tokens or chat_model.DEFAULT_MAX_NEW_TOKENS},
                    pip_requirements=model_requirements(),  # inferring them imports every installed package
                    tags={WEIGHTS_DTYPE_TAG: dtype},
                )
        return info.model_uri


def export_weights(checkpoint: Path, out: Path, dtype: str = "float32") -> Path:
    """A checkpoint as a serving folder: safetensors in `dtype` (float32 keeps the fp32 master weights a bf16
    autocast run trains and its benchmark scores by default; bfloat16 halves them), config, generation config
    and tokenizer with its chat template; the trainer's resume state is left behind."""
    from sftkey.models import load_model, load_tokenizer

    model = load_model(checkpoint, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(checkpoint).save_pretrained(out)
    return out


def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to the versions that wrote it."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}"
            for package in ("mlflow", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "pandas",
                            "pydantic", "tqdm")]


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
                log.warning(f"MLflow at {redact(self.tracking_uri)} {why}; "
                            f"tracking to {redact(self.fallback_tracking_uri)} instead")
            self._resolved_uri = self.fallback_tracking_uri
        else:
            raise TrackingUnavailable(
                f"MLflow tracking store {redact(self.tracking_uri)} {why}. Nothing was trained. "
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
        if found is None:
            location = self.artifact_location or default_artifact_location(self.resolve_uri())
            try:
                return client.create_experiment(self.experiment, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except Exception:  # another process created it between our look-up and create
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made before, or by someone else: mark, never overrule
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return found.experiment_id

    def start_pipeline_run(self, name: str, tags: dict[str, str] | None = None) -> str:
        """A parent run for one pipeline run; its id goes into `parent_run_id` of every asset's resource."""
        run = self.client().create_run(self.experiment_id(), run_name=name,
                                       tags={**context_tags(), PIPELINE_RUN_TAG: name, **owner_tags(), **(tags or {})})
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
    def asset_run(self, context: dg.AssetExecutionContext, tags: dict[str, str] | None = None,
                  cell: str | None = None) -> Iterator[MlflowTracker]:
        """One MLflow run for this materialization, FINISHED on success and FAILED when the asset raises. A cell's
        asset (sft_tag/seed0/stage1_model) is named by its asset and `cell` ("sft_tag|0")."""
        client = self.client()
        asset = context.asset_key.path[-1]
        dagster_run = context.run.run_id
        run_tags = {**context_tags(), PARENT_TAG: self.parent_for(dagster_run), DAGSTER_RUN_TAG: dagster_run,
                    ASSET_TAG: asset,
                    **owner_tags(),
                    **({CELL_TAG: cell} if cell else {}), **(tags or {})}
        run_name = f"{asset}[{cell}]" if cell else asset
        run = client.create_run(self.experiment_id(), run_name=run_name, tags=run_tags)
        tracker = MlflowTracker(client, run.info.run_id)
        try:
            yield tracker
        except BaseException as error:
            client.set_terminated(run.info.run_id, "KILLED" if is_interrupt(error) else "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")

    def reap_dead_runs(self, reaper: str) -> list[str]:
        """Mark KILLED the RUNNING runs of this experiment whose process is gone (kill -9, a crash); runs of a
        live process or of another host are left alone. Returns the ids marked."""
        client = self.client()
        host = socket.gethostname()
        reaped = []
        running = client.search_runs([self.experiment_id()], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = "
                                     f"'{host}'", max_results=1000)
        for run in running:
            pid = int(run.data.tags.get(PID_TAG, "0") or 0)
            if pid and not process_alive(pid):
                client.set_tag(run.info.run_id, REAPED_TAG, f"process {pid} on {host} was gone; marked KILLED by "
                                                            f"{reaper}")
                client.set_terminated(run.info.run_id, "KILLED")
                reaped.append(run.info.run_id)
        return reaped

    def end_open_children(self, parent_run_id: str, status: str = "KILLED") -> None:
        """End the parent's asset runs still RUNNING (an interrupted step may not have ended its own)."""
        client = self.client()
        for run in client.search_runs([self.experiment_id()], f"attributes.status = 'RUNNING' and "
                                      f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000):
            client.set_terminated(run.info.run_id, status)

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}/runs/{run_id}"
