"""The MLflow resource against a real sqlite store: the tracker Protocol, one run per materialization nested under
one parent per Dagster run, failed runs marked FAILED, and an unreachable server failing before any work."""


import math

import dagster as dg
import pytest

from orchestration.tracking import (
    ASSET_TAG,
    PARENT_TAG,
    MlflowResource,
    MlflowTracker,
    TrackingUnavailable,
    flatten,
    metric_name,
)

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def tracking(tmp_path) -> MlflowResource:
    return MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}", experiment="test")


def test_flatten_and_metric_names():
    assert flatten({"train": {"lr": 2e-5, "betas": [0.9, 0.95]}, "lora": None, "tagged": True}) == {
        "train.lr": "2e-05", "train.betas": "[0.9, 0.95]", "lora": "null", "tagged": "true"}
    assert metric_name("gsm8k_tagged/exact_match,strict-match") == "gsm8k_tagged/exact_match/strict-match"


def test_tracker_protocol_writes_params_metrics_and_artifacts(tracking, tmp_path):
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id()).info.run_id
    tracker = MlflowTracker(client, run_id)
    tracker.log_params({"train": {"lr": 0.001}, "arm": "sft_tag"})
    tracker.log_metrics({"loss": 1.5, "exact_match,strict-match": 0.25, "bad": math.nan}, step=3)
    tracker.log_metric_rows([(1, {"loss": 3.0}), (2, {"loss": 2.0})])
    (tmp_path / "exclusions.jsonl").write_text('{"uid": "a"}\n')
    tracker.log_artifact(tmp_path / "exclusions.jsonl")
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.001", "arm": "sft_tag"}
    assert run.data.metrics == {"loss": 1.5, "exact_match/strict-match": 0.25}  # NaN left out
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["exclusions.jsonl"]


def test_experiment_keeps_artifacts_beside_the_store(tracking, tmp_path):
    experiment = tracking.client().get_experiment(tracking.experiment_id())
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()


@dg.asset
def counted(context: dg.AssetExecutionContext, tracking: MlflowResource) -> int:
    with tracking.asset_run(context) as run:
        run.log_metrics({"value": 7.0})
    return 7


@dg.asset
def broken(context: dg.AssetExecutionContext, tracking: MlflowResource) -> int:
    with tracking.asset_run(context):
        raise RuntimeError("injected failure")


def test_one_run_per_materialization_nested_under_its_dagster_run(tracking):
    # Two materializations in one process: the dagster-mlflow integration fails the second one.
    first = dg.materialize([counted], resources={"tracking": tracking})
    second = dg.materialize([counted], resources={"tracking": tracking})
    assert first.success and second.success
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id()], f"tags.`{ASSET_TAG}` = 'counted'")
    assert len(runs) == 2
    parents = {run.data.tags[PARENT_TAG] for run in runs}
    assert len(parents) == 2  # one parent per Dagster run
    for parent_id in parents:
        assert client.get_run(parent_id).data.tags["sftkey.pipeline_run"] in (first.run_id, second.run_id)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.metrics["value"] for run in runs} == {7.0}


def test_a_failing_asset_marks_its_run_failed(tracking):
    result = dg.materialize([broken], resources={"tracking": tracking}, raise_on_error=False)
    assert not result.success
    (run,) = tracking.client().search_runs([tracking.experiment_id()], f"tags.`{ASSET_TAG}` = 'broken'")
    assert run.info.status == "FAILED"


def test_unreachable_server_fails_with_what_to_do():
    resource = MlflowResource(tracking_uri=UNREACHABLE, timeout_s=2)
    with pytest.raises(TrackingUnavailable) as error:
        resource.resolve_uri()
    message = str(error.value)
    assert message.startswith(f"MLflow tracking store {UNREACHABLE} did not answer (")
    assert "Nothing was trained" in message and "tracking.fallback_tracking_uri" in message


def test_unreachable_server_falls_back_to_a_local_store_when_configured(tmp_path):
    fallback = f"sqlite:///{tmp_path / 'local.db'}"
    resource = MlflowResource(tracking_uri=UNREACHABLE, fallback_tracking_uri=fallback, timeout_s=2)
    assert resource.resolve_uri() == fallback
    assert resource.client().tracking_uri == fallback
