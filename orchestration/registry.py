"""The MLflow model registry: register candidates, the promotion gate, and the lineage walk back from a version.

A candidate version carries its per-question benchmark outcomes as an artifact of its benchmark run, so a
later candidate can be tested against the champion question by question (sftkey.compare's paired tests).

The gate refuses a candidate that failed a check, a candidate whose logged weights are not in the dtype it was
scored in or are not the weights it was scored with (the model served would not be the model scored: checked on
the parameters themselves, orchestration.served_weights), a first champion below `min_accuracy`, a champion
scored on another benchmark (BENCHMARK_TAG differs, even with the same question ids) and outcomes that are not
booleans. Moving `champion` is compare-and-set under a lock: if another pipeline moved it since the gate ran, the gate runs
again against the new champion. Registering the same weights on the same benchmark again reuses its version, and
versions left undecided by a pipeline that died are marked `interrupted`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from orchestration.served_weights import (ServedWeightsError, scored_parameters_sha256, served_parameters_sha256,
                                          served_weights_problem)
from orchestration.tracking import PARENT_TAG, WEIGHTS_DTYPE_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHALLENGER = "challenger"
CHAMPION = "champion"
OUTCOMES_ARTIFACT = "outcomes.json"  # {question id: correct} of the benchmark run that a version points to

# Tags on a model version: its benchmark run (evidence for the next gate) and what the gate decided.
BENCHMARK_RUN_TAG = "sftkey.benchmark_run_id"
BENCHMARK_TAG = "sftkey.benchmark"  # JSON of benchmark_identity(): only versions with equal ones are compared
WEIGHTS_TAG = "sftkey.weights_sha256"  # with BENCHMARK_TAG: what makes a registration a rerun of an earlier one
PIPELINE_RUN_TAG = "sftkey.pipeline_run_id"  # the MLflow parent run that registered the version
REGISTERED_BY_TAG = "sftkey.registered_by"  # host:pid of that process, to tell a live registration from an orphan
DECISION_TAG = "promotion.decision"  # promoted | refused | interrupted (its pipeline died before the gate)
COMPARED_WITH_TAG = "promotion.champion_version"  # the champion the gate compared with (compare-and-set)

DEFAULT_MIN_ACCURACY = 0.05  # strict accuracy the first champion needs: an untrained model scores ~0

# The summary.json fields (sftkey.evaluate) that decide which questions were asked and how: the records' content
# version covers the file, carve and subsample; the rest are the prompt format and the generation settings.
BENCHMARK_KEYS = ("dataset", "split", "limit", "data_version", "n_questions", "tagged", "dtype", "max_new_tokens",
                  "temperature", "sampling_seed", "exclude_training_questions")


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
    alpha: float = 0.05
    min_accuracy: float = DEFAULT_MIN_ACCURACY
    failed_checks: tuple[str, ...] = ()

    def tags(self) -> dict[str, str]:
        """The decision as registry tags (`promotion.*`), every field present so a reader never guesses."""
        return {DECISION_TAG: "promoted" if self.promote else "refused",
                **{f"promotion.{k}": json.dumps(v) for k, v in asdict(self).items() if k != "promote"}}


class GateSettingError(ValueError):
    """A gate setting that would let any candidate through (negative, NaN or infinite margin, ...)."""


def check_gate_settings(margin_points: float, alpha: float, min_accuracy: float) -> None:
    """The gate's settings are finite and in range (the pipeline config checks them at load time too)."""
    if not (math.isfinite(margin_points) and margin_points >= 0):
        raise GateSettingError(f"promotion.margin_points must be a finite number >= 0, got {margin_points}")
    if not 0 < alpha < 1:
        raise GateSettingError(f"promotion.alpha must be in (0, 1), got {alpha}")
    if not 0 <= min_accuracy <= 1:
        raise GateSettingError(f"promotion.min_accuracy must be in [0, 1], got {min_accuracy}")


def benchmark_identity(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a benchmark's outcomes, from its summary.json: two versions are compared only when equal."""
    return {key: summary.get(key) for key in BENCHMARK_KEYS}


def benchmark_difference(candidate: Mapping | None, champion: Mapping | None) -> str | None:
    """Why two benchmark identities do not pair (None when they do)."""
    if candidate is None or champion is None:
        which = "the candidate" if candidate is None else "the champion"
        return f"{which} records no benchmark identity ({BENCHMARK_TAG} tag)"
    differ = [f"{k} {champion.get(k)!r} vs {candidate.get(k)!r}" for k in sorted(set(candidate) | set(champion))
              if candidate.get(k) != champion.get(k)]
    return "; ".join(differ) or None


def weights_dtype_problem(benchmark: Mapping | None, weights_dtype: str | None) -> str | None:
    """Why the candidate's logged weights are not the weights its benchmark scored (None when they are): bf16
    weights answer differently from the fp32 ones on a share of questions (benchmarks/eval_precision.py)."""
    scored = (benchmark or {}).get("dtype")
    if weights_dtype is not None and weights_dtype == scored:
        return None
    return (f"the candidate's logged weights are {weights_dtype or 'of no recorded dtype'} ({WEIGHTS_DTYPE_TAG} tag) "
            f"but its benchmark scored it in {scored or 'no recorded dtype'}: the model served would not be the "
            "model scored; log the model in the dtype its benchmark scores in (benchmark.dtype) and rerun")


def logged_weights_dtype(client: "MlflowClient", model_uri: str) -> str | None:
    """The dtype a logged model (`models:/<model id>`) stores its weights in, as MlflowTracker.log_model tagged it."""
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    model_id = _parse_model_id_if_present(model_uri)
    return client.get_logged_model(model_id).tags.get(WEIGHTS_DTYPE_TAG) if model_id else None


def accuracy_of(outcomes: Mapping[str, bool]) -> float:
    return sum(outcomes.values()) / len(outcomes) if outcomes else 0.0


def decide(candidate: Mapping[str, bool], champion: Mapping[str, bool] | None, margin_points: float,
           alpha: float, champion_version: str | None = None, *, min_accuracy: float = DEFAULT_MIN_ACCURACY,
           failed_checks: Sequence[str] = (), candidate_benchmark: Mapping | None = None,
           champion_benchmark: Mapping | None = None, weights_dtype: str | None = None,
           scored_parameters: str | None = None, served_parameters: str | None = None) -> Decision:
    """Refuse a candidate that failed a check, whose logged weights (`weights_dtype`) are not in the dtype its
    benchmark scored it in, or whose served parameters hash (`served_parameters`) is not the one its benchmark
    recorded (`scored_parameters`); with no champion, promote one that reaches `min_accuracy`; else
    promote only on the same benchmark when it beats the champion by `margin_points` accuracy points with a
    significant paired difference (sftkey.compare: an exact sign test over the questions, p < alpha)."""
    from sftkey.compare import compare_arms

    check_gate_settings(margin_points, alpha, min_accuracy)
    accuracy = accuracy_of(candidate)
    settings = dict(margin_points=margin_points, alpha=alpha, min_accuracy=min_accuracy,
                    failed_checks=tuple(failed_checks))
    if failed_checks:
        return Decision(False, f"the candidate failed checks: {', '.join(failed_checks)}; fix them and rerun",
                        accuracy, champion_version=champion_version, **settings)
    if not candidate:
        return Decision(False, "the candidate answered no questions", accuracy, **settings)
    served_otherwise = (weights_dtype_problem(candidate_benchmark, weights_dtype)
                        or served_weights_problem(scored_parameters, served_parameters))
    if served_otherwise:
        return Decision(False, served_otherwise, accuracy, champion_version=champion_version, **settings)
    if champion is None:
        if accuracy < min_accuracy:
            return Decision(False, f"no champion yet, and strict accuracy {accuracy:.3f} is below the floor for a "
                            f"first champion (promotion.min_accuracy {min_accuracy:.3f})", accuracy, **settings)
        return Decision(True, f"no champion yet: strict accuracy {accuracy:.3f} reaches promotion.min_accuracy "
                        f"{min_accuracy:.3f}; the first candidate becomes champion", accuracy, **settings)
    champion_accuracy = accuracy_of(champion)
    other_benchmark = benchmark_difference(candidate_benchmark, champion_benchmark)
    if other_benchmark:
        return Decision(False, f"the champion (version {champion_version}) was scored on another benchmark "
                        f"({other_benchmark}): benchmark both the same way", accuracy, champion_accuracy,
                        champion_version=champion_version, **settings)
    if set(candidate) != set(champion):
        return Decision(False, f"the champion (version {champion_version}) was scored on other questions "
                        f"({len(champion)} vs {len(candidate)}; {len(set(candidate) ^ set(champion))} differ): "
                        "benchmark both on the same questions", accuracy, champion_accuracy,
                        champion_version=champion_version, **settings)
    result = compare_arms({"candidate": {0: candidate}, "champion": {0: champion}}, "candidate", "champion",
                          alpha=alpha)
    evidence = dict(candidate_accuracy=accuracy, champion_accuracy=champion_accuracy,
                    difference_points=result.difference, ci_points=result.ci, p_value=result.p_value,
                    champion_version=champion_version, **settings)
    if result.difference < margin_points:
        return Decision(False, f"{result.verdict()}; below the margin of {margin_points:+.1f} points", **evidence)
    if not result.significant:
        return Decision(False, f"{result.verdict()}; the paired difference is not significant", **evidence)
    return Decision(True, f"{result.verdict()}; beats the champion by the margin", **evidence)


def promotion_lock(tracking_uri: str, name: str):
    """A file lock held while registering or moving `champion`: MLflow has no compare-and-set on aliases. Beside a
    sqlite store it serializes every process using that store; for a server, the processes of this host."""
    from filelock import FileLock

    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    else:
        folder = Path(tempfile.gettempdir())
    digest = hashlib.sha256(f"{tracking_uri}|{name}".encode()).hexdigest()[:16]
    return FileLock(str(folder / f".sftkey-promotion-{digest}.lock"))


def registration_tags(parent_run_id: str | None) -> dict[str, str]:
    """Who registers: the pipeline's parent run and this process (host:pid)."""
    return {PIPELINE_RUN_TAG: parent_run_id or "", REGISTERED_BY_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def _registration_alive(client: "MlflowClient", version: "ModelVersion") -> bool:
    """Whether the pipeline run that registered `version` may still decide on it: its parent run is RUNNING and,
    on this host, its process exists."""
    from mlflow.exceptions import MlflowException

    parent = version.tags.get(PIPELINE_RUN_TAG)
    host, _, pid = version.tags.get(REGISTERED_BY_TAG, "").rpartition(":")
    try:
        if parent and client.get_run(parent).info.status != "RUNNING":
            return False
    except MlflowException:
        return False
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, another user's
            return True
    return True


def _undecided(client: "MlflowClient", name: str) -> list["ModelVersion"]:
    """Versions registered by a pipeline (they carry PIPELINE_RUN_TAG) that no gate has decided on yet."""
    versions = client.search_model_versions(f"name = '{name}'")
    return [v for v in versions if PIPELINE_RUN_TAG in v.tags and DECISION_TAG not in v.tags]


def _same_candidate(client: "MlflowClient", name: str, tags: Mapping[str, str]) -> "ModelVersion | None":
    """The version registered earlier for the same weights and benchmark, if any (the lowest number)."""
    weights, benchmark = tags.get(WEIGHTS_TAG), tags.get(BENCHMARK_TAG)
    if not weights or not benchmark:
        return None
    same = [v for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get(WEIGHTS_TAG) == weights and v.tags.get(BENCHMARK_TAG) == benchmark]
    return min(same, key=lambda v: int(v.version)) if same else None


def mark_interrupted(client: "MlflowClient", name: str, keep: str | None = None) -> list[str]:
    """Decide orphans: versions whose registering pipeline ended before its gate ran become `interrupted`."""
    marked = []
    for version in _undecided(client, name):
        if str(version.version) == keep or _registration_alive(client, version):
            continue
        reason = (f"pipeline run {version.tags.get(PIPELINE_RUN_TAG) or '?'} ended before the promotion gate "
                  "decided on this version; it was never compared and is not a candidate")
        client.set_model_version_tag(name, str(version.version), "promotion.reason", json.dumps(reason))
        client.set_model_version_tag(name, str(version.version), DECISION_TAG, "interrupted")
        marked.append(str(version.version))
    return marked


def register_candidate(client: "MlflowClient", name: str, model_uri: str, run_id: str,
                       tags: dict[str, str], tracking_uri: str | None = None,
                       metrics: Mapping[str, Any] | None = None) -> "ModelVersion":
    """The candidate as a version of `name`, aliased `challenger`: the earlier version of the same weights and
    benchmark when there is one (a rerun adds no version), else a new one. Orphans are marked on the way.
    `metrics` (its benchmark scores) become metrics of the version's logged model (see log_version_metrics)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    model_id = _parse_model_id_if_present(model_uri)  # as mlflow.register_model links a version to its model
    if metrics and not model_id:
        raise ValueError(f"{model_uri}: metrics need a logged model to hold them; register the "
                         "`models:/<model id>` uri that MlflowTracker.log_model returns")
    tags = {k: str(v) for k, v in tags.items()}
    with promotion_lock(tracking_uri or client.tracking_uri, name):
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = _same_candidate(client, name, tags)
        mark_interrupted(client, name, keep=None if version is None else str(version.version))
        if version is None:
            version = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
            log_version_metrics(client, version, metrics or {})
        elif DECISION_TAG not in version.tags:  # an orphan of the same weights: this run decides on it
            for key in (PIPELINE_RUN_TAG, REGISTERED_BY_TAG):
                if key in tags:
                    client.set_model_version_tag(name, str(version.version), key, tags[key])
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def benchmark_dataset(benchmark: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(name, digest) of the evaluation data set a benchmark identity describes, e.g. ("gsm8k-test", data
    version): the name and digest the benchmark run logs it under as an MLflow dataset input."""
    if not benchmark or not benchmark.get("dataset") or not benchmark.get("data_version"):
        return None
    from orchestration.tracking import DATASET_DIGEST_CHARS

    split = benchmark.get("split")
    name = f"{benchmark['dataset']}-{split}" if split else str(benchmark["dataset"])
    return name, str(benchmark["data_version"])[:DATASET_DIGEST_CHARS]


def logged_model_id(version: "ModelVersion") -> str | None:
    """The logged model a version points to: MLflow's sqlite/file registry keeps no model_id, only the source."""
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    return version.model_id or _parse_model_id_if_present(version.source)


def log_version_metrics(client: "MlflowClient", version: "ModelVersion", metrics: Mapping[str, Any]) -> None:
    """Benchmark scores as MLflow metrics of the version's logged model (MLflow 3 shows them on the version and
    the model page), logged in the benchmark run (BENCHMARK_RUN_TAG) and tied to its evaluation data set.
    Non-numeric and non-finite values are left out: MLflow stores no NaN."""
    from mlflow.entities import Metric

    from orchestration.tracking import metric_name

    scores = {metric_name(k): float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if not scores:
        return
    model_id = logged_model_id(version)
    if not model_id:
        raise ValueError(f"model version {version.name} v{version.version} has no logged model to hold its "
                         "metrics: register the `models:/<model id>` uri that MlflowTracker.log_model returns")
    run_id = version.tags.get(BENCHMARK_RUN_TAG) or version.run_id
    dataset_name, digest = benchmark_dataset(version_benchmark(version)) or (None, None)
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0, model_id=model_id, dataset_name=dataset_name,
                                             dataset_digest=digest, run_id=run_id) for k, v in scores.items()])


def version_metrics(client: "MlflowClient", version: "ModelVersion") -> dict[str, float]:
    """The metrics of a version's logged model, by name (the latest value of each)."""
    model_id = logged_model_id(version)
    if not model_id:
        return {}
    latest = {}
    for metric in sorted(client.get_logged_model(model_id).metrics or [], key=lambda m: m.timestamp):
        latest[metric.key] = metric.value
    return latest


def version_by_alias(client: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model, or no such alias yet
        return None


class OutcomesError(ValueError):
    """A version's outcomes.json is not a mapping of question id to true/false."""


def check_outcomes(outcomes: Any, where: str) -> dict[str, bool]:
    """`outcomes` as {question id: bool}; anything else (1, "yes", null, a list) is refused, never coerced."""
    if not isinstance(outcomes, dict):
        raise OutcomesError(f"{where}: {OUTCOMES_ARTIFACT} is a {type(outcomes).__name__}, not a mapping of "
                            "question id to true/false")
    bad = [(uid, value) for uid, value in outcomes.items() if not isinstance(value, bool)]
    if bad:
        uid, value = bad[0]
        raise OutcomesError(f"{where}: {OUTCOMES_ARTIFACT} has {len(bad)} non-boolean outcomes (e.g. {uid!r}: "
                            f"{value!r}); outcomes must be true or false")
    return outcomes


def version_outcomes(client: "MlflowClient", version: "ModelVersion") -> dict[str, bool]:
    """The per-question outcomes that a version's benchmark run logged, checked to be booleans."""
    where = f"model version {version.name} v{version.version}"
    run_id = version.tags.get(BENCHMARK_RUN_TAG)
    if not run_id:
        raise OutcomesError(f"{where} has no {BENCHMARK_RUN_TAG} tag: register it through the pipeline "
                            "(registered_model) so it carries its benchmark")
    with tempfile.TemporaryDirectory(prefix="sftkey-outcomes-") as tmp:
        path = client.download_artifacts(run_id, OUTCOMES_ARTIFACT, tmp)
        try:
            outcomes = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OutcomesError(f"{where}: {OUTCOMES_ARTIFACT} is not JSON ({error})") from None
    return check_outcomes(outcomes, where)


def version_benchmark(version: "ModelVersion") -> dict | None:
    text = version.tags.get(BENCHMARK_TAG)
    return json.loads(text) if text else None


def evaluate_gate(client: "MlflowClient", name: str, version: str, margin_points: float, alpha: float,
                  min_accuracy: float = DEFAULT_MIN_ACCURACY, failed_checks: Sequence[str] = ()) -> Decision:
    """Decide on `version` against the current champion and record the decision and evidence as its tags
    (the `promotion.decision` tag last: a crash mid-way leaves the version undecided, never half-decided)."""
    check_gate_settings(margin_points, alpha, min_accuracy)
    candidate = client.get_model_version(name, version)
    champion = version_by_alias(client, name, CHAMPION)
    champion_version = None if champion is None else str(champion.version)  # MLflow gives int or str by call
    if champion_version == str(version):  # a rerun of the champion itself: keep its decision and evidence
        return Decision(True, f"version {version} is already the champion", float("nan"),
                        champion_version=champion_version, margin_points=margin_points, alpha=alpha,
                        min_accuracy=min_accuracy)
    settings = dict(min_accuracy=min_accuracy, failed_checks=failed_checks,
                    weights_dtype=candidate.tags.get(WEIGHTS_DTYPE_TAG),
                    candidate_benchmark=version_benchmark(candidate),
                    champion_benchmark=None if champion is None else version_benchmark(champion))
    try:
        candidate_outcomes = version_outcomes(client, candidate)
        champion_outcomes = None if champion is None else version_outcomes(client, champion)
        settings |= {"scored_parameters": scored_parameters_sha256(client, candidate, candidate.tags[BENCHMARK_RUN_TAG]),
                     "served_parameters": served_parameters_sha256(client, candidate)}
        decision = decide(candidate_outcomes, champion_outcomes, margin_points, alpha, champion_version, **settings)
    except (OutcomesError, ServedWeightsError) as error:
        what = "unusable outcomes" if isinstance(error, OutcomesError) else "served weights not verified"
        decision = Decision(False, f"{what}: {error}", float("nan"), champion_version=champion_version,
                            margin_points=margin_points, alpha=alpha, min_accuracy=min_accuracy,
                            failed_checks=tuple(failed_checks))
    tags = decision.tags()
    for key, value in sorted(tags.items(), key=lambda item: item[0] == DECISION_TAG):
        client.set_model_version_tag(name, version, key, value)
    return decision


def promote(client: "MlflowClient", name: str, version: str, tracking_uri: str | None = None) -> Decision:
    """Compare-and-set: move `champion` to `version` only if the champion is still the one its gate compared
    with; if another pipeline moved it since, run the gate again against the new champion first."""
    with promotion_lock(tracking_uri or client.tracking_uri, name):
        tags = client.get_model_version(name, version).tags
        if tags.get(DECISION_TAG) != "promoted":
            return Decision(False, f"version {version} has no promoted decision from the gate "
                            f"({DECISION_TAG}: {tags.get(DECISION_TAG)})", float("nan"))
        current = version_by_alias(client, name, CHAMPION)
        current_version = None if current is None else str(current.version)
        if current_version == str(version):
            return Decision(True, f"version {version} is already the champion", float("nan"),
                            champion_version=current_version)
        decision = Decision(True, json.loads(tags.get("promotion.reason", '""')), float("nan"),
                            champion_version=current_version)
        if json.loads(tags.get(COMPARED_WITH_TAG, "null")) != current_version:
            setting = {k: json.loads(tags[f"promotion.{k}"]) for k in ("margin_points", "alpha", "min_accuracy")}
            decision = evaluate_gate(client, name, version, **setting,
                                     failed_checks=json.loads(tags.get("promotion.failed_checks", "[]")))
            if not decision.promote:
                return replace(decision, reason=f"the champion changed to version {current_version} after the "
                               f"gate ran; against it: {decision.reason}")
        client.set_registered_model_alias(name, CHAMPION, version)
        return decision


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
