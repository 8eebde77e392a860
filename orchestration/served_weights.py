"""Is the model a registry version serves the model its benchmark scored? Checked on the weights themselves.

The benchmark (sftkey.evaluate) records the hash of the parameters it generated with (`parameters_sha256` in its
summary.json, logged to the benchmark run). The gate downloads the weights the version's logged model serves, loads
them as the chat model loads them (in their stored dtype) and hashes them the same way
(sftkey.weights_digest.parameters_sha256). Tags say what a version should hold; only these bytes say what it does
hold: another checkpoint logged by mistake, weights swapped in the artifact store, or a lossy export all differ.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

SCORED_KEY = "parameters_sha256"  # in the benchmark's summary.json
WEIGHTS_PATH = "artifacts/weights"  # where mlflow.pyfunc keeps chat_model.WEIGHTS_ARTIFACT inside a logged model

# transformers' from_pretrained builds models under process-wide state (a meta-device context): two gates in threads
# of one process must not load at once
_LOADING = threading.Lock()


class ServedWeightsError(ValueError):
    """The evidence for the check cannot be read: no benchmark summary, no logged model, weights that do not load."""


def served_weights_problem(scored: str | None, served: str | None) -> str | None:
    """Why the served weights are not shown to be the scored ones (None when they are)."""
    if not scored:
        return (f"its benchmark recorded no hash of the parameters it scored ({SCORED_KEY} in summary.json, written "
                "by sftkey.evaluate): benchmark it again so the weights served can be checked against it")
    if not served:
        return "the weights it serves were not hashed: nothing shows that they are the weights scored"
    if served != scored:
        return (f"the candidate's logged weights are not the weights its benchmark scored (parameters sha256 "
                f"{served[:16]} served, {scored[:16]} scored): the model served would not be the model scored; "
                "register the logged model of the checkpoint that was benchmarked")
    return None


def scored_parameters_sha256(client: "MlflowClient", version: "ModelVersion", benchmark_run_id: str) -> str | None:
    """The parameters hash in the summary.json that the version's benchmark run logged (None when it has none)."""
    from mlflow.exceptions import MlflowException

    from sftkey.evaluate import SUMMARY

    with tempfile.TemporaryDirectory(prefix="sftkey-summary-") as tmp:
        try:
            path = client.download_artifacts(benchmark_run_id, SUMMARY, tmp)
            summary = json.loads(Path(path).read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError) as error:
            raise ServedWeightsError(f"{_name(version)}: benchmark run {benchmark_run_id} has no readable {SUMMARY} "
                                     f"({type(error).__name__}: {error})") from None
    value = summary.get(SCORED_KEY) if isinstance(summary, dict) else None
    return value if isinstance(value, str) else None


def served_parameters_sha256(client: "MlflowClient", version: "ModelVersion") -> str:
    """parameters_sha256 of the weights the version's logged model serves, loaded in their stored dtype."""
    import mlflow
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    from sftkey.models import load_model
    from sftkey.weights_digest import parameters_sha256

    model_id = version.model_id or _parse_model_id_if_present(version.source)
    if not model_id:
        raise ServedWeightsError(f"{_name(version)}: its source {version.source} is not a logged model "
                                 "(models:/<model id>), so the weights it serves cannot be read; register the uri "
                                 "that MlflowTracker.log_model returns")
    with tempfile.TemporaryDirectory(prefix="sftkey-served-") as tmp:
        try:
            location = client.get_logged_model(model_id).artifact_location.rstrip("/")
            folder = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{WEIGHTS_PATH}", dst_path=tmp,
                                                         tracking_uri=client.tracking_uri)
            with _LOADING:
                model = load_model(folder, dtype="auto")  # as chat_model serves it
        except Exception as error:  # missing artifacts, an unreadable or cut weights file: nothing to vouch for
            raise ServedWeightsError(f"{_name(version)}: the weights of logged model {model_id} ({WEIGHTS_PATH}) "
                                     f"do not load ({type(error).__name__}: {error})") from None
        return parameters_sha256(model)


def _name(version: "ModelVersion") -> str:
    return f"model version {version.name} v{version.version}"
