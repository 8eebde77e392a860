"""Each way a worse model became champion, refused, on a real sqlite MLflow registry: gate settings that let
anything through (refused at load time), a first champion at 0% accuracy, a candidate that failed a check, a
champion scored on another benchmark with the same question ids, a candidate whose logged weights are in another
dtype than it was scored in or are not the weights it was scored with (or cannot be checked), non-boolean outcomes,
two pipelines racing for the alias; and the registry's own state: a rerun adds no version, an orphan of a dead run is marked interrupted.
The failed-check case also runs the real pipeline on the tiny model through the `sftkey` CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from orchestration.registry import (
    BENCHMARK_RUN_TAG,
    BENCHMARK_TAG,
    CHAMPION,
    DECISION_TAG,
    OUTCOMES_ARTIFACT,
    PIPELINE_RUN_TAG,
    REGISTERED_BY_TAG,
    WEIGHTS_TAG,
    GateSettingError,
    decide,
    evaluate_gate,
    promote,
    register_candidate,
    version_by_alias,
)
from orchestration.tracking import WEIGHTS_DTYPE_TAG
from tests.orchestration.conftest import (SMOKE_CONFIG, log_benchmark_summary, log_served_model, seed_mlflow_store,
                                          smoke_raw, write_config)

QUESTIONS = [f"q{i:02d}" for i in range(20)]
BENCH = {"dataset": "svamp", "split": "test", "limit": 20, "data_version": "d1", "n_questions": 20, "tagged": True,
         "dtype": "float32", "max_new_tokens": 40, "temperature": 0.0, "sampling_seed": 0,
         "exclude_training_questions": False}


def outcomes(right: int) -> dict[str, bool]:
    """The first `right` questions correct: each level is a superset of the lower ones (discordant pairs one way)."""
    return {q: i < right for i, q in enumerate(QUESTIONS)}


ZERO, WEAK, MID, STRONG = outcomes(0), outcomes(1), outcomes(7), outcomes(13)  # 0, 5, 35, 65 %; 6 discordant steps
GATE = dict(margin_points=1.0, alpha=0.05, min_accuracy=0.05)


SERVED: dict[str, tuple[str, str]] = {}  # tracking uri -> (the logged model every version serves, its hash)
SCORED = object()  # register(scored=...) default: the benchmark scored the weights the version serves


@pytest.fixture(scope="module")
def client(tmp_path_factory, mlflow_template, tiny_model_dir):
    """One real sqlite registry per module (a copy of the session's migrated store); each test its own model name.
    Every version serves the tiny model's weights from one logged model, as the gate downloads and hashes them."""
    import mlflow
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("registry")
    client = MlflowClient(f"sqlite:///{seed_mlflow_store(mlflow_template, folder / 'mlflow.db')}")
    mlflow.set_tracking_uri(client.tracking_uri)  # the registry resolves a models:/ source through it
    experiment = client.create_experiment("gate", artifact_location=(folder / "artifacts").as_uri())
    SERVED[client.tracking_uri] = log_served_model(client, experiment, tiny_model_dir)
    return client


def benchmark_run(client, tmp_path: Path, correct, scored: str | None) -> str:
    """A run holding `correct` as its outcomes.json (any JSON: the gate must refuse what is not a bool mapping) and
    a summary.json recording `scored` as the hash of the parameters it scored."""
    run = client.create_run(client.get_experiment_by_name("gate").experiment_id).info.run_id
    folder = tmp_path / run
    folder.mkdir()
    (folder / OUTCOMES_ARTIFACT).write_text(json.dumps(correct))
    client.log_artifact(run, str(folder / OUTCOMES_ARTIFACT))
    log_benchmark_summary(client, run, folder, scored)
    return run


def register(client, tmp_path: Path, name: str, correct, bench: dict | None = BENCH, weights: str | None = None,
             scored=SCORED, source: str | None = None, **extra_tags) -> str:
    experiment = client.get_experiment_by_name("gate").experiment_id
    model_run = client.create_run(experiment).info.run_id
    served_uri, served_sha = SERVED[client.tracking_uri]
    tags = {BENCHMARK_RUN_TAG: benchmark_run(client, tmp_path, correct, served_sha if scored is SCORED else scored),
            WEIGHTS_TAG: weights or f"sha-{model_run}", WEIGHTS_DTYPE_TAG: "float32", **extra_tags}
    tags = {k: v for k, v in tags.items() if v is not None}  # a tag given as None is left out
    if bench is not None:
        tags[BENCHMARK_TAG] = json.dumps(bench, sort_keys=True)
    return str(register_candidate(client, name, source or served_uri, model_run, tags).version)


def champion(client, name: str) -> str | None:
    version = version_by_alias(client, name, CHAMPION)
    return None if version is None else str(version.version)


def gate_and_promote(client, name: str, version: str, **settings):
    decision = evaluate_gate(client, name, version, **(GATE | settings))
    return promote(client, name, version) if decision.promote else decision


# ---------------------------------------------------------------------------------- settings, at load time


def promotion_config(tmp_path: Path, **promotion) -> Path:
    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["work_dir"] = str(tmp_path / "work")
    raw["promotion"] = {"model_name": "m", **promotion}
    return write_config(raw, tmp_path / "pipeline.yaml")


@pytest.mark.parametrize("key, value, message", [
    ("margin_points", -5.0, "must be a finite number >= 0 (accuracy points the candidate must gain over the champion), got -5.0"),
    ("margin_points", float("nan"), "must be a finite number >= 0 (accuracy points the candidate must gain over the champion), got nan"),
    ("margin_points", float("-inf"), "must be a finite number >= 0 (accuracy points the candidate must gain over the champion), got -inf"),
    ("margin_points", float("inf"), "must be a finite number >= 0 (accuracy points the candidate must gain over the champion), got inf"),
    ("alpha", float("nan"), "must be in (0, 1), got nan"),
    ("alpha", 1.0, "must be in (0, 1), got 1.0"),
    ("min_accuracy", float("nan"), "must be in [0, 1] (strict accuracy the first champion needs), got nan"),
    ("min_accuracy", -0.1, "must be in [0, 1] (strict accuracy the first champion needs), got -0.1"),
    ("min_accuracy", 1.5, "must be in [0, 1] (strict accuracy the first champion needs), got 1.5"),
])
def test_gate_settings_that_let_anything_through_are_refused_at_load_time(tmp_path, key, value, message):
    from orchestration.config import load_pipeline_config
    from sftkey.config_file import ConfigError

    path = promotion_config(tmp_path, **{key: value})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f"{key}:"))
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(path)
    assert str(error.value) == f"{path} line {line}: promotion.{key}: {message}"
    assert not (tmp_path / "work").exists()


def test_the_cli_names_a_bad_margin_in_one_line(tmp_path, capsys):
    from sftkey.cli import main

    path = promotion_config(tmp_path, margin_points=float("-inf"))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"sftkey pipeline: error: {path} line ") and err.endswith(": promotion.margin_points: must be a "
                                                                         "finite number >= 0 (accuracy points the "
                                                                         "candidate must gain over the champion), "
                                                                         "got -inf")


def test_decide_itself_refuses_non_finite_settings():
    for margin in (float("nan"), float("-inf"), -1.0):
        with pytest.raises(GateSettingError, match="promotion.margin_points must be a finite number >= 0"):
            decide(STRONG, WEAK, margin, 0.05, candidate_benchmark=BENCH, champion_benchmark=BENCH,
                   weights_dtype="float32")


# ---------------------------------------------------------------------------------- the gate's refusals


def test_a_first_champion_at_zero_accuracy_is_refused(client, tmp_path):
    name = "first-floor"
    version = register(client, tmp_path, name, ZERO)
    decision = gate_and_promote(client, name, version)
    assert decision.promote is False
    assert decision.reason == ("no champion yet, and strict accuracy 0.000 is below the floor for a first champion "
                               "(promotion.min_accuracy 0.050)")
    tags = client.get_model_version(name, version).tags
    assert (tags[DECISION_TAG], json.loads(tags["promotion.min_accuracy"])) == ("refused", 0.05)
    assert champion(client, name) is None
    at_floor = register(client, tmp_path, name, WEAK)  # 1/20 = 0.05: exactly the floor
    assert gate_and_promote(client, name, at_floor).promote is True
    assert champion(client, name) == at_floor


def test_a_candidate_that_failed_a_check_is_refused(client, tmp_path):
    name = "failed-check"
    version = register(client, tmp_path, name, STRONG)
    failed = ["check_benchmark_scores_format_accuracy [sftkey_tag|0]"]
    decision = gate_and_promote(client, name, version, failed_checks=failed)
    assert decision.promote is False
    assert decision.reason == ("the candidate failed checks: check_benchmark_scores_format_accuracy [sftkey_tag|0]; "
                               "fix them and rerun")
    assert json.loads(client.get_model_version(name, version).tags["promotion.failed_checks"]) == failed
    assert champion(client, name) is None


def test_a_champion_scored_on_another_benchmark_with_the_same_uids_is_not_compared(client, tmp_path):
    name = "other-benchmark"
    first = register(client, tmp_path, name, WEAK)
    assert gate_and_promote(client, name, first).promote
    other = register(client, tmp_path, name, STRONG, bench=BENCH | {"data_version": "d2", "max_new_tokens": 256})
    decision = gate_and_promote(client, name, other)
    assert decision.promote is False
    assert decision.reason == (f"the champion (version {first}) was scored on another benchmark (data_version 'd1' vs "
                               "'d2'; max_new_tokens 40 vs 256): benchmark both the same way")
    assert decision.p_value is None  # no test on unpaired questions
    unlabelled = register(client, tmp_path, name, STRONG, bench=None)  # no benchmark: no dtype it was scored in
    decision = gate_and_promote(client, name, unlabelled)
    assert decision.reason.startswith("the candidate's logged weights are float32 (sftkey.weights_dtype tag) but its "
                                      "benchmark scored it in no recorded dtype")
    assert champion(client, name) == first
    assert decide(STRONG, WEAK, 1.0, 0.05, candidate_benchmark=None, champion_benchmark=BENCH).reason == (
        f"the candidate's logged weights are of no recorded dtype ({WEIGHTS_DTYPE_TAG} tag) but its benchmark scored "
        "it in no recorded dtype: the model served would not be the model scored; log the model in the dtype its "
        "benchmark scores in (benchmark.dtype) and rerun")


@pytest.mark.parametrize("weights_dtype, shown", [("bfloat16", "bfloat16"), (None, "of no recorded dtype")])
def test_a_candidate_served_in_another_dtype_than_it_was_scored_in_is_refused(client, tmp_path, tiny_model_dir,
                                                                             weights_dtype, shown):
    """bf16 weights answer differently from the fp32 ones they were rounded from on a share of the questions
    (benchmarks/eval_precision.py): scores of the fp32 weights say nothing sure about the bf16 model served."""
    name = f"served-{weights_dtype}"
    version = register(client, tmp_path, name, STRONG, **{WEIGHTS_DTYPE_TAG: weights_dtype})
    decision = gate_and_promote(client, name, version)
    assert decision.promote is False
    assert decision.reason == (f"the candidate's logged weights are {shown} ({WEIGHTS_DTYPE_TAG} tag) but its "
                               "benchmark scored it in float32: the model served would not be the model scored; log "
                               "the model in the dtype its benchmark scores in (benchmark.dtype) and rerun")
    assert client.get_model_version(name, version).tags[DECISION_TAG] == "refused"
    assert champion(client, name) is None
    # scored in bf16 and served in bf16: the same model, so the gate goes on to the accuracy rules
    uri, scored = log_served_model(client, client.get_experiment_by_name("gate").experiment_id,
                                   saved_weights(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16"))
    bf16 = register(client, tmp_path, name, STRONG, bench=BENCH | {"dtype": "bfloat16"}, source=uri, scored=scored,
                    **{WEIGHTS_DTYPE_TAG: "bfloat16"})
    assert gate_and_promote(client, name, bf16).promote is True
    assert champion(client, name) == bf16


def saved_weights(tiny_model_dir: Path, folder: Path, dtype: str = "float32", shift: float = 0.0) -> Path:
    """The tiny model saved to `folder` in `dtype`, its final norm shifted by `shift` (another checkpoint)."""
    import torch

    from sftkey.models import load_model, load_tokenizer

    model = load_model(tiny_model_dir, dtype=dtype)
    with torch.no_grad():
        model.model.norm.weight.add_(shift)
    model.save_pretrained(folder)
    load_tokenizer(tiny_model_dir).save_pretrained(folder)
    return folder


def served_folder(client, model_uri: str) -> Path:
    """Where a file artifact store keeps the weights a logged model serves."""
    from urllib.parse import urlparse

    from orchestration.served_weights import WEIGHTS_PATH

    location = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return Path(urlparse(location).path) / WEIGHTS_PATH


@pytest.mark.parametrize("how", ["another checkpoint logged", "weights swapped in the store"])
def test_a_candidate_whose_served_weights_are_not_the_scored_ones_is_refused(client, tmp_path, tiny_model_dir, how):
    """Every tag says the right thing; only the bytes served differ from the ones scored."""
    from sftkey.models import load_model
    from sftkey.weights_digest import parameters_sha256

    experiment = client.get_experiment_by_name("gate").experiment_id
    other = saved_weights(tiny_model_dir, tmp_path / "other", shift=1.0)
    name = f"served-{how.split()[0]}"
    if how == "another checkpoint logged":  # the benchmark scored the tiny model, the version serves `other`
        served_uri, served = log_served_model(client, experiment, other)
        version = register(client, tmp_path, name, STRONG, source=served_uri)
        scored = SERVED[client.tracking_uri][1]
    else:  # registered with matching hashes, then its weights file replaced where the registry serves it from
        served_uri, scored = log_served_model(client, experiment, saved_weights(tiny_model_dir, tmp_path / "own"))
        version = register(client, tmp_path, name, STRONG, source=served_uri, scored=scored)
        shutil.copyfile(other / "model.safetensors", served_folder(client, served_uri) / "model.safetensors")
        served = parameters_sha256(load_model(other))
    assert served != scored
    decision = gate_and_promote(client, name, version)
    assert decision.promote is False
    assert decision.reason == (f"the candidate's logged weights are not the weights its benchmark scored (parameters "
                               f"sha256 {served[:16]} served, {scored[:16]} scored): the model served would not be "
                               "the model scored; register the logged model of the checkpoint that was benchmarked")
    assert client.get_model_version(name, version).tags[DECISION_TAG] == "refused"
    assert champion(client, name) is None


def test_served_weights_that_cannot_be_checked_are_refused(client, tmp_path, tiny_model_dir):
    """No hash in the benchmark's summary, a source that is no logged model, served weights that do not load, a
    benchmark summary lost from the store."""
    from urllib.parse import urlparse

    name = "unverifiable"
    version = register(client, tmp_path, name, STRONG, scored=None)
    assert gate_and_promote(client, name, version).reason == (
        "its benchmark recorded no hash of the parameters it scored (parameters_sha256 in summary.json, written by "
        "sftkey.evaluate): benchmark it again so the weights served can be checked against it")
    model_run = client.create_run(client.get_experiment_by_name("gate").experiment_id).info.run_id
    version = register(client, tmp_path, name, STRONG, source=f"runs:/{model_run}/model")
    assert gate_and_promote(client, name, version).reason == (
        f"served weights not verified: model version {name} v{version}: its source runs:/{model_run}/model is not a "
        "logged model (models:/<model id>), so the weights it serves cannot be read; register the uri that "
        "MlflowTracker.log_model returns")
    served_uri, scored = log_served_model(client, client.get_experiment_by_name("gate").experiment_id,
                                          saved_weights(tiny_model_dir, tmp_path / "cut"))
    version = register(client, tmp_path, name, STRONG, source=served_uri, scored=scored)
    weights = served_folder(client, served_uri) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut, as a crashed copy leaves it
    reason = gate_and_promote(client, name, version).reason
    assert reason.startswith(f"served weights not verified: model version {name} v{version}: the weights of logged "
                             f"model {served_uri.removeprefix('models:/')} (artifacts/weights) do not load (")
    version = register(client, tmp_path, name, STRONG)
    summary = client.get_model_version(name, version).tags[BENCHMARK_RUN_TAG]
    (Path(urlparse(client.get_run(summary).info.artifact_uri).path) / "summary.json").unlink()  # lost from the store
    assert gate_and_promote(client, name, version).reason.startswith(
        f"served weights not verified: model version {name} v{version}: benchmark run {summary} has no readable "
        "summary.json (")
    assert [client.get_model_version(name, str(v)).tags[DECISION_TAG] for v in (1, 2, 3, 4)] == ["refused"] * 4
    assert champion(client, name) is None


@pytest.mark.parametrize("bad, detail", [
    ({**STRONG, "q00": 1, "q01": "yes"}, "has 2 non-boolean outcomes (e.g. 'q00': 1); outcomes must be true or false"),
    ([True, False], "is a list, not a mapping of question id to true/false"),
])
def test_non_boolean_outcomes_are_refused(client, tmp_path, bad, detail):
    name = f"outcomes-{type(bad).__name__}"
    version = register(client, tmp_path, name, bad)
    decision = gate_and_promote(client, name, version)
    assert decision.promote is False
    assert decision.reason == f"unusable outcomes: model version {name} v{version}: {OUTCOMES_ARTIFACT} {detail}"
    assert client.get_model_version(name, version).tags[DECISION_TAG] == "refused"
    assert champion(client, name) is None


def test_promote_without_a_promoted_decision_moves_nothing(client, tmp_path):
    name = "no-decision"
    version = register(client, tmp_path, name, STRONG)
    decision = promote(client, name, version)
    assert (decision.promote, decision.reason) == (False, f"version {version} has no promoted decision from the gate "
                                                          "(promotion.decision: None)")
    assert champion(client, name) is None


# ---------------------------------------------------------------------------------- the race


@pytest.mark.parametrize("last", ["mid", "strong"])
def test_the_better_model_wins_the_race_whichever_finishes_last(client, tmp_path, last):
    """Both gates compare with the same champion, then both move the alias: the later move re-reads the alias,
    sees the other candidate, runs the gate against it, and refuses when it no longer wins."""
    name = f"race-{last}"
    first = register(client, tmp_path, name, WEAK)
    gate_and_promote(client, name, first)
    mid, strong = register(client, tmp_path, name, MID), register(client, tmp_path, name, STRONG)
    assert evaluate_gate(client, name, mid, **GATE).promote and evaluate_gate(client, name, strong, **GATE).promote
    order = [strong, mid] if last == "mid" else [mid, strong]
    decisions = [promote(client, name, version) for version in order]
    assert champion(client, name) == strong
    tags = client.get_model_version(name, order[1]).tags
    assert json.loads(tags["promotion.champion_version"]) == order[0]  # the second gate ran against the first
    if last == "mid":
        assert decisions[1].promote is False
        assert decisions[1].reason.startswith(f"the champion changed to version {strong} after the gate ran; "
                                              "against it: ")
        assert tags[DECISION_TAG] == "refused"
    else:
        assert decisions[1].promote is True and decisions[1].difference_points == 30.0


def test_two_concurrent_promotions_end_with_the_better_model(client, tmp_path):
    """Two threads, each with its own client on one sqlite registry, gate against the same champion, then move
    the alias at once; repeated with each side given a head start."""
    from mlflow import MlflowClient

    for head_start in ("mid", "strong"):
        name = f"threads-{head_start}"
        first = register(client, tmp_path, name, WEAK)
        gate_and_promote(client, name, first)
        versions = {"mid": register(client, tmp_path, name, MID), "strong": register(client, tmp_path, name, STRONG)}
        gated = threading.Barrier(2)
        errors = []

        def pipeline(which: str) -> None:
            try:
                own = MlflowClient(client.tracking_uri)
                assert evaluate_gate(own, name, versions[which], **GATE).promote
                gated.wait(timeout=60)
                if which != head_start:
                    threading.Event().wait(0.2)
                promote(own, name, versions[which])
            except BaseException as error:  # surfaced below: a thread's assert would be lost
                errors.append(error)

        threads = [threading.Thread(target=pipeline, args=(which,)) for which in versions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert champion(client, name) == versions["strong"], head_start


# ---------------------------------------------------------------------------------- registration state


def test_a_rerun_of_the_same_weights_and_benchmark_adds_no_version(client, tmp_path):
    name = "idempotent"
    first = register(client, tmp_path, name, WEAK, weights="w1")
    assert gate_and_promote(client, name, first).promote
    again = register(client, tmp_path, name, WEAK, weights="w1")
    assert again == first
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    decision = gate_and_promote(client, name, again)  # the champion itself: nothing to move, evidence kept
    assert (decision.promote, decision.reason) == (True, f"version {first} is already the champion")
    assert client.get_model_version(name, first).tags[DECISION_TAG] == "promoted"
    other_benchmark = register(client, tmp_path, name, WEAK, bench=BENCH | {"limit": 10}, weights="w1")
    other_weights = register(client, tmp_path, name, WEAK, weights="w2")
    assert len({first, other_benchmark, other_weights}) == 3


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_orphan_of_a_dead_run_is_marked_interrupted_and_a_live_one_is_left(client, tmp_path):
    name = "orphans"
    experiment = client.get_experiment_by_name("gate").experiment_id
    dead_parent = client.create_run(experiment).info.run_id
    client.set_terminated(dead_parent, "KILLED")
    live_parent = client.create_run(experiment).info.run_id  # RUNNING, registered by this very process
    host = socket.gethostname()
    orphan = register(client, tmp_path, name, MID, weights="w-orphan",
                      **{PIPELINE_RUN_TAG: dead_parent, REGISTERED_BY_TAG: f"{host}:{dead_pid()}"})
    crashed = register(client, tmp_path, name, MID, weights="w-crashed",  # parent never ended: its pid tells
                       **{PIPELINE_RUN_TAG: live_parent, REGISTERED_BY_TAG: f"{host}:{dead_pid()}"})
    live = register(client, tmp_path, name, MID, weights="w-live",
                    **{PIPELINE_RUN_TAG: live_parent, REGISTERED_BY_TAG: f"{host}:{os.getpid()}"})
    register(client, tmp_path, name, STRONG, weights="w-next")  # the next registration cleans up
    for version, parent in ((orphan, dead_parent), (crashed, live_parent)):
        tags = client.get_model_version(name, version).tags
        assert tags[DECISION_TAG] == "interrupted"
        assert json.loads(tags["promotion.reason"]) == (f"pipeline run {parent} ended before the promotion gate "
                                                        "decided on this version; it was never compared and is not "
                                                        "a candidate")
    assert DECISION_TAG not in client.get_model_version(name, live).tags


def test_an_orphan_of_the_same_weights_is_reused_and_decided(client, tmp_path):
    name = "orphan-reused"
    experiment = client.get_experiment_by_name("gate").experiment_id
    dead_parent = client.create_run(experiment).info.run_id
    client.set_terminated(dead_parent, "FAILED")
    orphan = register(client, tmp_path, name, MID, weights="w1",
                      **{PIPELINE_RUN_TAG: dead_parent, REGISTERED_BY_TAG: f"{socket.gethostname()}:{dead_pid()}"})
    parent = client.create_run(experiment).info.run_id
    rerun = register(client, tmp_path, name, MID, weights="w1",
                     **{PIPELINE_RUN_TAG: parent, REGISTERED_BY_TAG: f"{socket.gethostname()}:{os.getpid()}"})
    assert rerun == orphan
    assert client.get_model_version(name, orphan).tags[PIPELINE_RUN_TAG] == parent  # now this run's to decide
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert gate_and_promote(client, name, rerun).promote
    assert champion(client, name) == orphan


# ---------------------------------------------------------------------------------- which checks bar promotion


def test_failed_checks_reads_the_latest_error_evaluation_of_the_candidate_cell():
    """On a real (ephemeral) Dagster instance: an ERROR failure on the candidate's cell or on the shared upstream
    data counts; a WARN failure, another arm's failure, a pass and a failure later passed do not."""
    import dagster as dg

    from orchestration.assets import cell_key
    from orchestration.checks import failed_checks, gated_check_keys
    from orchestration.pipeline import PIPELINE_RUN_TAG

    instance = dg.DagsterInstance.ephemeral()

    def evaluation(key, check, passed, severity=dg.AssetCheckSeverity.ERROR):
        instance.report_runless_asset_event(dg.AssetCheckEvaluation(
            asset_key=key, check_name=check, passed=passed, metadata={}, severity=severity))

    evaluation(cell_key("sftkey_tag", 0, "benchmark_scores"), "check_benchmark_scores_format_accuracy", False)
    evaluation(cell_key("sft_tag", 0, "benchmark_scores"), "check_benchmark_scores_format_accuracy", False)
    evaluation(cell_key("sftkey_tag", 0, "benchmark_scores"), "check_benchmark_scores_length_cap", False,
               dg.AssetCheckSeverity.WARN)
    evaluation(cell_key("sftkey_tag", 0, "stage2_model"), "check_stage2_model_answer_loss", False)
    evaluation(cell_key("sftkey_tag", 0, "stage2_model"), "check_stage2_model_answer_loss", True)  # the latest
    evaluation(dg.AssetKey("annotated_dataset"), "check_annotated_dataset_coverage", False)
    assert failed_checks(instance, {}, gated_check_keys("sftkey_tag", 0)) == [
        "check_annotated_dataset_coverage", "check_benchmark_scores_format_accuracy [sftkey_tag|0]"]
    assert failed_checks(instance, {}, gated_check_keys("other", 0)) == ["check_annotated_dataset_coverage"]
    # Within a pipeline run only its own Dagster runs count: these evaluations belong to none.
    assert failed_checks(instance, {PIPELINE_RUN_TAG: "smoke-1"}, gated_check_keys("sftkey_tag", 0)) == []


# ---------------------------------------------------------------------------------- the real pipeline


def test_a_failed_format_check_blocks_promotion_and_the_cli_exits_1(smoke_run, tmp_path, monkeypatch, capsys):
    """The smoke pipeline again (its checkpoints and scores are reused) with a format floor no model reaches, into
    a fresh registered model: the check fails, the gate refuses naming it, nothing becomes champion, exit 1."""
    from orchestration.config import resources
    from sftkey.cli import main

    raw = smoke_raw(Path(smoke_run.raw["training"]["model"]), Path(smoke_run.raw["work_dir"]),
                    checks={"min_annotation_coverage": 0.9, "min_format_accuracy": 1.0},
                    promotion={"model_name": "format-gate", "margin_points": 1.0, "alpha": 0.05})
    path = write_config(raw, tmp_path / "format_gate.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))  # its own instance: smoke_run's checks untouched
    assert main(["pipeline", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "Registry: format-gate v1 (sftkey_tag seed 0) is @challenger; not promoted: the candidate failed checks: " \
           "check_benchmark_scores_format_accuracy [sftkey_tag|0]" in out
    assert err.strip().splitlines()[-1] == ("sftkey pipeline: promotion refused: the candidate failed checks: "
                                            "check_benchmark_scores_format_accuracy [sftkey_tag|0]; fix them and "
                                            "rerun")
    assert "Traceback" not in err
    client = resources(smoke_run.config)["tracking"].client()
    assert version_by_alias(client, "format-gate", CHAMPION) is None
    assert client.get_model_version("format-gate", "1").tags[DECISION_TAG] == "refused"
