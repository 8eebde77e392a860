"""The MLflow model registry: register candidates, the promotion gate, and the lineage walk back from a version.

A candidate version carries its per-question benchmark outcomes as an artifact of its benchmark run, so a
later candidate can be tested against the champion question by question (sftkey.compare's paired tests).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from orchestration.tracking import PARENT_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHALLENGER = "challenger"
CHAMPION = "champion"
OUTCOMES_ARTIFACT = "outcomes.json"  # {question id: correct} of the benchmark run that a version points to

# Tags on a model version: its benchmark run (evidence for the next gate) and what the gate decided.
BENCHMARK_RUN_TAG = "sftkey.benchmark_run_id"
DECISION_TAG = "promotion.decision"  # promoted | refused


@dataclass(frozen=True)
class Decision:
    """The promotion gate's verdict on a candidate, with the numbers it rests on."""

    promote: bool
    reason: str
    candidate_accuracy: float
    champion_accuracy: float | None = None
    difference_points: float | None = None
    ci_points: tuple[float, float] | None = None
    p_value: float | None = None
    margin_points: float = 0.0
    champion_version: str | None = None

    def tags(self) -> dict[str, str]:
        """The decision as registry tags (`promotion.*`), every field present so a reader never guesses."""
        return {DECISION_TAG: "promoted" if self.promote else "refused",
                **{f"promotion.{k}": json.dumps(v) for k, v in asdict(self).items() if k != "promote"}}


def decide(candidate: Mapping[str, bool], champion: Mapping[str, bool] | None, margin_points: float,
           alpha: float, champion_version: str | None = None) -> Decision:
    """Promote when there is no champion, or when the candidate beats it by `margin_points` accuracy points
    with a significant paired difference (sftkey.compare: bootstrap interval excludes 0 and exact p < alpha)."""
    from sftkey.compare import compare_arms

    accuracy = sum(map(bool, candidate.values())) / len(candidate) if candidate else 0.0
    if champion is None:
        return Decision(True, "no champion yet: the first candidate becomes champion", accuracy,
                        margin_points=margin_points)
    champion_accuracy = sum(map(bool, champion.values())) / len(champion) if champion else 0.0
    if set(candidate) != set(champion):
        return Decision(False, f"the champion (version {champion_version}) was scored on other questions "
                        f"({len(champion)} vs {len(candidate)}; {len(set(candidate) ^ set(champion))} differ): "
                        "benchmark both on the same questions", accuracy, champion_accuracy,
                        margin_points=margin_points, champion_version=champion_version)
    result = compare_arms({"candidate": {0: candidate}, "champion": {0: champion}}, "candidate", "champion",
                          alpha=alpha)
    evidence = dict(candidate_accuracy=accuracy, champion_accuracy=champion_accuracy,
                    difference_points=result.difference, ci_points=result.ci, p_value=result.p_value,
                    margin_points=margin_points, champion_version=champion_version)
    if result.difference < margin_points:
        return Decision(False, f"{result.verdict()}; below the margin of {margin_points:+.1f} points", **evidence)
    if not result.significant:
        return Decision(False, f"{result.verdict()}; the paired difference is not significant", **evidence)
    return Decision(True, f"{result.verdict()}; beats the champion by the margin", **evidence)


def register_candidate(client: "MlflowClient", name: str, model_uri: str, run_id: str,
                       tags: dict[str, str]) -> "ModelVersion":
    """A new version of `name` from a logged model, aliased `challenger`."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=model_uri, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def version_by_alias(client: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model, or no such alias yet
        return None


def version_outcomes(client: "MlflowClient", version: "ModelVersion") -> dict[str, bool]:
    """The per-question outcomes that a version's benchmark run logged."""
    run_id = version.tags.get(BENCHMARK_RUN_TAG)
    if not run_id:
        raise ValueError(f"model version {version.name} v{version.version} has no {BENCHMARK_RUN_TAG} tag: "
                         "register it through the pipeline (registered_model) so it carries its benchmark")
    with tempfile.TemporaryDirectory(prefix="sftkey-outcomes-") as tmp:
        path = client.download_artifacts(run_id, OUTCOMES_ARTIFACT, tmp)
        return json.loads(Path(path).read_text())


def evaluate_gate(client: "MlflowClient", name: str, version: str, margin_points: float,
                  alpha: float) -> Decision:
    """Decide on `version` against the current champion and record the decision and evidence as its tags."""
    candidate = client.get_model_version(name, version)
    champion = version_by_alias(client, name, CHAMPION)
    decision = decide(version_outcomes(client, candidate),
                      None if champion is None else version_outcomes(client, champion), margin_points, alpha,
                      None if champion is None else str(champion.version))  # MLflow gives int or str by call
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    return decision


def promote(client: "MlflowClient", name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)


@dataclass(frozen=True)
class Lineage:
    """Everything one registered version came from."""

    name: str
    version: str
    run_id: str  # the MLflow run that logged the model (the final training stage)
    config: dict[str, str]  # that run's params: the resolved config
    data_version: str | None
    dvc_rev: str | None
    pipeline_run_id: str | None  # the parent run of the whole pipeline run
    pipeline_run_name: str | None
    tags: dict[str, str]  # the version's tags (arm, seed, promotion decision, ...)


def walk_lineage(client: "MlflowClient", name: str, version_or_alias: str) -> Lineage:
    """From `name` version N (or `@alias`) to its run, config, data version and parent pipeline run."""
    if version_or_alias.isdigit():
        version = client.get_model_version(name, version_or_alias)
    else:
        version = client.get_model_version_by_alias(name, version_or_alias.lstrip("@"))
    run = client.get_run(version.run_id)
    parent_id = run.data.tags.get(PARENT_TAG)
    parent = client.get_run(parent_id) if parent_id else None
    return Lineage(
        name=name,
        version=str(version.version),
        run_id=run.info.run_id,
        config=dict(run.data.params),
        data_version=run.data.tags.get("sftkey.data_version"),
        dvc_rev=run.data.tags.get("sftkey.dvc_rev"),
        pipeline_run_id=parent_id,
        pipeline_run_name=parent.info.run_name if parent else None,
        tags=dict(version.tags),
    )


def lineage_lines(lineage: Lineage) -> list[str]:
    """The walk as text, for `sftkey pipeline` and the regression report."""
    return [
        f"{lineage.name} v{lineage.version} <- run {lineage.run_id}",
        f"  data version {lineage.data_version}, DVC revision {lineage.dvc_rev}",
        f"  pipeline run {lineage.pipeline_run_name} ({lineage.pipeline_run_id})",
        f"  config: {len(lineage.config)} params",
    ]
