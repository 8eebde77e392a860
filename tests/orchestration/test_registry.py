"""The promotion gate: the decision on fixed outcomes (exact numbers), then the same gate on a real sqlite MLflow
registry: first champion, promote, refuse. The ways to fool the gate are in test_promotion.py."""

from __future__ import annotations

import json

import pytest

from orchestration.tracking import WEIGHTS_DTYPE_TAG
from tests.orchestration.conftest import log_benchmark_summary, log_served_model
from orchestration.registry import (
    BENCHMARK_RUN_TAG,
    BENCHMARK_TAG,
    CHALLENGER,
    CHAMPION,
    OUTCOMES_ARTIFACT,
    benchmark_dataset,
    decide,
    evaluate_gate,
    logged_model_id,
    promote,
    register_candidate,
    version_by_alias,
    version_metrics,
)

QUESTIONS = [f"q{i}" for i in range(10)]
BENCH = {"dataset": "svamp", "split": "test", "limit": 10, "data_version": "abc", "n_questions": 10, "tagged": True,
         "dtype": "float32", "max_new_tokens": 40, "temperature": 0.0, "sampling_seed": 0,
         "exclude_training_questions": False}
SERVED = dict(weights_dtype="float32", scored_parameters="ab" * 32, served_parameters="ab" * 32)  # served = scored
SAME = dict(candidate_benchmark=BENCH, champion_benchmark=BENCH, **SERVED)


def outcomes(right: set[int]) -> dict[str, bool]:
    return {q: i in right for i, q in enumerate(QUESTIONS)}


WEAK = outcomes({0, 1})  # 2 of 10
STRONG = outcomes({0, 1, 2, 3, 4, 5, 6, 7})  # 8 of 10, a superset of WEAK: 6 discordant pairs, all one way


def test_no_champion_promotes_the_first_candidate():
    decision = decide(WEAK, None, margin_points=1.0, alpha=0.05, candidate_benchmark=BENCH, **SERVED)
    assert decision.promote is True
    assert decision.reason == ("no champion yet: strict accuracy 0.200 reaches promotion.min_accuracy 0.050; "
                               "the first candidate becomes champion")
    assert decision.candidate_accuracy == 0.2
    assert decision.tags()["promotion.decision"] == "promoted"


@pytest.mark.parametrize("served, scored, reason", [
    (None, "ab" * 32, "the weights it serves were not hashed: nothing shows that they are the weights scored"),
    ("cd" * 32, None, "its benchmark recorded no hash of the parameters it scored (parameters_sha256 in summary.json, "
                      "written by sftkey.evaluate): benchmark it again so the weights served can be checked against it"),
    ("cd" * 32, "ab" * 32, "the candidate's logged weights are not the weights its benchmark scored (parameters sha256 "
                           "cdcdcdcdcdcdcdcd served, abababababababab scored): the model served would not be the model "
                           "scored; register the logged model of the checkpoint that was benchmarked"),
], ids=["served-unhashed", "scored-unhashed", "differ"])
def test_a_far_better_candidate_whose_served_weights_are_not_shown_to_be_scored_is_refused(served, scored, reason):
    decision = decide(STRONG, WEAK, 1.0, 0.05, **(SAME | {"served_parameters": served, "scored_parameters": scored}))
    assert (decision.promote, decision.reason) == (False, reason)


def test_a_significantly_better_candidate_is_promoted():
    decision = decide(STRONG, WEAK, margin_points=1.0, alpha=0.05, champion_version="3", **SAME)
    assert decision.promote is True
    assert decision.difference_points == 60.0
    assert decision.p_value == 0.03125  # exact McNemar: 2 * (1/2)^6
    assert decision.ci_points[0] > 0
    assert (decision.candidate_accuracy, decision.champion_accuracy) == (0.8, 0.2)
    assert decision.reason.endswith("beats the champion by the margin")
    assert json.loads(decision.tags()["promotion.champion_version"]) == "3"


def test_a_gain_below_the_margin_is_refused():
    decision = decide(STRONG, WEAK, margin_points=70.0, alpha=0.05, **SAME)
    assert decision.promote is False
    assert decision.reason.endswith("below the margin of +70.0 points")
    assert decision.tags()["promotion.decision"] == "refused"


def test_a_gain_that_is_not_significant_is_refused():
    one_more = outcomes({0, 1, 2})  # one discordant pair: p = 1
    decision = decide(one_more, WEAK, margin_points=1.0, alpha=0.05, **SAME)
    assert decision.promote is False
    assert decision.difference_points == 10.0
    assert decision.p_value == 1.0
    assert decision.reason.endswith("the paired difference is not significant")


def test_different_questions_are_refused_without_a_test():
    other = {f"x{i}": True for i in range(10)}
    decision = decide(other, WEAK, margin_points=1.0, alpha=0.05, champion_version="1", **SAME)
    assert decision.promote is False
    assert decision.p_value is None
    assert "scored on other questions (10 vs 10; 20 differ)" in decision.reason


@pytest.fixture
def client(tmp_path, mlflow_db):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_db}")  # a copy of the session's migrated store (conftest)
    mlflow.set_tracking_uri(client.tracking_uri)  # the registry resolves a models:/ source through it
    client.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    return client


def candidate(client, tmp_path, name: str, correct: dict[str, bool], weights) -> str:
    """A benchmark run holding the outcomes and the hash of the weights it scored, a logged model serving those
    weights, and a registered version."""
    experiment = client.get_experiment_by_name("gate").experiment_id
    model_uri, scored = log_served_model(client, experiment, weights)
    bench = client.create_run(experiment).info.run_id
    (tmp_path / OUTCOMES_ARTIFACT).write_text(json.dumps(correct))
    client.log_artifact(bench, str(tmp_path / OUTCOMES_ARTIFACT))
    log_benchmark_summary(client, bench, tmp_path / bench, scored)
    model_run = client.create_run(experiment).info.run_id
    version = register_candidate(client, "gate-model", model_uri, model_run,
                                 {BENCHMARK_RUN_TAG: bench, BENCHMARK_TAG: json.dumps(BENCH), "sftkey.arm": name,
                                  WEIGHTS_DTYPE_TAG: "float32"})
    return str(version.version)


def test_gate_on_a_real_registry(client, tmp_path, tiny_model_dir):
    first = candidate(client, tmp_path, "weak", WEAK, tiny_model_dir)
    assert version_by_alias(client, "gate-model", CHAMPION) is None
    assert str(version_by_alias(client, "gate-model", CHALLENGER).version) == first
    decision = evaluate_gate(client, "gate-model", first, margin_points=1.0, alpha=0.05)
    assert decision.promote
    promote(client, "gate-model", first)
    assert str(version_by_alias(client, "gate-model", CHAMPION).version) == first

    better = candidate(client, tmp_path, "strong", STRONG, tiny_model_dir)
    decision = evaluate_gate(client, "gate-model", better, margin_points=1.0, alpha=0.05)
    assert (decision.promote, decision.difference_points, decision.p_value) == (True, 60.0, 0.03125)
    tags = client.get_model_version("gate-model", better).tags
    assert tags["promotion.decision"] == "promoted"
    assert json.loads(tags["promotion.champion_version"]) == first
    promote(client, "gate-model", better)

    same = candidate(client, tmp_path, "same", STRONG, tiny_model_dir)
    decision = evaluate_gate(client, "gate-model", same, margin_points=1.0, alpha=0.05)
    assert decision.promote is False
    tags = client.get_model_version("gate-model", same).tags
    assert tags["promotion.decision"] == "refused"
    assert json.loads(tags["promotion.difference_points"]) == 0.0
    assert str(version_by_alias(client, "gate-model", CHAMPION).version) == better
    assert str(version_by_alias(client, "gate-model", CHALLENGER).version) == same


# ---------------------------------------------------------------------------------- version metrics

def logged_model(client, tmp_path) -> tuple[str, str, str]:
    """A logged model (MLflow 3: what a version links to) and a benchmark run holding the outcomes."""
    experiment = client.get_experiment_by_name("gate").experiment_id
    bench = client.create_run(experiment).info.run_id
    (tmp_path / OUTCOMES_ARTIFACT).write_text(json.dumps(WEAK))
    client.log_artifact(bench, str(tmp_path / OUTCOMES_ARTIFACT))
    model_run = client.create_run(experiment).info.run_id
    model = client.create_logged_model(experiment, name="sft_tag-seed0", source_run_id=model_run)
    return model.model_id, model_run, bench


def test_benchmark_scores_are_metrics_of_the_version_not_tags(client, tmp_path):
    import mlflow

    # The registry resolves a `models:/m-...` source through the default store (MlflowResource.client sets it).
    mlflow.set_tracking_uri(client.tracking_uri)
    model_id, model_run, bench = logged_model(client, tmp_path)
    scores = {"strict_accuracy": 0.2, "exact_match,strict-match": 0.25, "n": 10, "ok": True, "bad": float("nan"),
              "arm": "sft_tag"}
    version = register_candidate(client, "scored", f"models:/{model_id}", model_run,
                                 {BENCHMARK_RUN_TAG: bench, BENCHMARK_TAG: json.dumps(BENCH)}, metrics=scores)
    assert logged_model_id(version) == model_id
    assert version_metrics(client, client.get_model_version("scored", version.version)) == {
        "strict_accuracy": 0.2, "exact_match/strict-match": 0.25, "n": 10.0}
    assert not [k for k in client.get_model_version("scored", version.version).tags if k.startswith("metric")]
    logged = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert (logged["strict_accuracy"].run_id, logged["strict_accuracy"].dataset_name,
            logged["strict_accuracy"].dataset_digest) == (bench, "svamp-test", "abc")
    assert client.get_run(bench).data.metrics["strict_accuracy"] == 0.2
    assert benchmark_dataset({"dataset": "gsm8k", "split": None, "data_version": "v1"}) == ("gsm8k", "v1")
    assert benchmark_dataset({"dataset": "gsm8k"}) is None
    assert benchmark_dataset({"dataset": "svamp", "split": "test", "data_version": "ab" * 32}) == ("svamp-test", "ab" * 18)


def test_metrics_without_a_logged_model_are_refused_before_registering(client, tmp_path):
    experiment = client.get_experiment_by_name("gate").experiment_id
    model_run = client.create_run(experiment).info.run_id
    with pytest.raises(ValueError, match=f"^runs:/{model_run}/model: metrics need a logged model to hold them; "):
        register_candidate(client, "plain", f"runs:/{model_run}/model", model_run, {}, metrics={"acc": 0.5})
    assert client.search_model_versions("name = 'plain'") == []
