"""The whole graph materialized in-process on the smoke config (tiny model, SVAMP) with a real sqlite MLflow store
and a real DVC repo: every asset and check, the MLflow runs and their nesting, the lineage walk from a registered
version, no retraining on an unchanged upstream, and resuming a crashed stage from its checkpoint."""

import json
from pathlib import Path

import dagster as dg
import pytest

from orchestration.config import pipeline_config_from_dict, resources
from orchestration.registry import CHAMPION, lineage_lines, version_by_alias, walk_lineage
from orchestration.tracking import ASSET_TAG, PARENT_TAG
from sftkey.models import weights_identity

ARMS = ["sft_tag", "sftkey_tag"]
CELLS = ["sft_tag|0", "sftkey_tag|0"]
CHECKS = {
    ("annotated_dataset", "check_annotated_dataset_coverage"): None,
    ("tokenized_dataset", "check_tokenized_dataset_too_long"): None,
    ("stage2_model", "check_stage2_model_answer_loss"): CELLS,
    ("benchmark_scores", "check_benchmark_scores_format_accuracy"): CELLS,
    ("registered_model", "check_registered_model_promotion_gate"): None,
}


def asset_key(asset: str, cell: str | None = None) -> dg.AssetKey:
    """The key of a data/report asset, or of a cell's ("sft_tag|0") stage1_model/stage2_model/benchmark_scores."""
    from orchestration.assets import cell_key

    if cell is None:
        return dg.AssetKey(asset)
    arm, seed = cell.split("|")
    return cell_key(arm, int(seed), asset)


def latest_metadata(instance, asset: str, cell: str | None = None) -> dict:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key(asset, cell)), limit=1).records
    assert records, f"{asset} [{cell}] was never materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_every_asset_and_check_materialized_in_one_run_of_the_named_job(smoke_run):
    instance = smoke_run.instance
    for asset in ["raw_dataset", "annotated_dataset", "tokenized_dataset", "arm_comparison", "registered_model",
                  "champion_model"]:
        latest_metadata(instance, asset)
    for asset in ["stage1_model", "stage2_model", "benchmark_scores"]:
        for cell in CELLS:
            latest_metadata(instance, asset, cell)
    for (asset, check), cells in CHECKS.items():
        for cell in cells or [None]:
            history = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(asset_key(asset, cell), check), limit=10)
            assert [record.status.value for record in history] == ["SUCCEEDED"], (check, cell)
    from orchestration.pipeline import PIPELINE_RUN_TAG

    runs = instance.get_runs(dg.RunsFilter(tags={PIPELINE_RUN_TAG: smoke_run.result.pipeline_run}))
    assert [(run.job_name, run.status.value) for run in runs] == [("sftkey_pipeline", "SUCCESS")]


def test_materialization_metadata_a_person_reads(smoke_run):
    instance = smoke_run.instance
    raw = latest_metadata(instance, "raw_dataset")
    assert raw["records"] == 64
    assert raw["dvc"].startswith("raw/svamp-train.jsonl @ ")
    annotated = latest_metadata(instance, "annotated_dataset")
    assert (annotated["kept"], annotated["excluded"], annotated["coverage"]) == (64, 0, 1.0)
    stage1 = latest_metadata(instance, "stage1_model", "sft_tag|0")
    assert (stage1["status"], stage1["steps"], stage1["loss"]) == ("trained", 60, "sft")
    # SFTKey-Tag's stage 1 is SFT-Tag's stage 1 (same stage key): reused, not trained again.
    assert latest_metadata(instance, "stage1_model", "sftkey_tag|0")["status"] == "reused"
    assert latest_metadata(instance, "stage2_model", "sft_tag|0")["status"] == "skipped"
    assert latest_metadata(instance, "stage2_model", "sftkey_tag|0")["steps"] == 10
    comparison = latest_metadata(instance, "arm_comparison")
    table = comparison["comparison"]
    assert table.startswith("| arm | accuracy | 95% CI | seed sd | format accuracy |")
    assert [line.split(" | ")[0] for line in table.splitlines()[2:4]] == ["| sft_tag", "| sftkey_tag"]
    assert "\n- sftkey_tag vs sft_tag: " in table
    # Dagster shows markdown over 1000 characters behind a button: the plots are short links the MLflow UI serves
    run_id = smoke_run.result.comparison["mlflow_run_id"]
    assert comparison["plots"] == "\n\n".join(
        f"![{name}](http://127.0.0.1:5000/get-artifact?path={name}.png&run_uuid={run_id})"
        for name in ("accuracy", "answer_loss"))
    assert len(comparison["plots"]) < 1000
    from orchestration.config import default_tracking_uri
    from orchestration.tracking import open_client

    logged = {a.path for a in open_client(default_tracking_uri(smoke_run.config)).list_artifacts(run_id)}
    assert {"accuracy.png", "answer_loss.png"} <= logged
    assert comparison["mlflow_run"].startswith("http://127.0.0.1:5000/#/experiments/")
    folder = Path(smoke_run.result.comparison["folder"])
    assert sorted(p.name for p in folder.iterdir()) == ["accuracy.csv", "accuracy.png", "answer_loss",
                                                        "answer_loss.png", "comparison.json", "comparison.md",
                                                        "metrics.json"]
    # SFTKey-Tag's benchmarked model descends from SFT-Tag's stage 1: their lineages meet, so they pair by seed.
    records = smoke_run.result.comparison["records"]
    base_keys, arm_keys = (set(records[f"{arm}|0"]["stage_keys"]) for arm in ("sft_tag", "sftkey_tag"))
    assert len(base_keys) == 1 and len(arm_keys) == 2 and base_keys < arm_keys


def test_mlflow_runs_one_per_materialization_under_the_pipeline_run(smoke_run):
    tracking = resources(smoke_run.config)["tracking"]
    client = tracking.client()
    children = client.search_runs([tracking.experiment_id()],
                                  f"tags.`{PARENT_TAG}` = '{smoke_run.result.parent_run_id}'")
    assets = sorted(run.data.tags[ASSET_TAG] for run in children)
    assert assets == sorted(["raw_dataset", "annotated_dataset", "tokenized_dataset", "arm_comparison",
                             "registered_model"] + [a for a in ("stage1_model", "stage2_model", "benchmark_scores")
                                                    for _ in ARMS])
    assert {run.info.status for run in children} == {"FINISHED"}
    parent = client.get_run(smoke_run.result.parent_run_id)
    assert (parent.info.run_name, parent.info.status) == (smoke_run.result.pipeline_run, "FINISHED")
    assert (parent.data.params["training.train.lr"], parent.data.params["pipeline.benchmark.limit"]) == ("0.01", "16")
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["pipeline_smoke.yaml"]
    stage1 = next(r for r in children if r.data.tags[ASSET_TAG] == "stage1_model"
                  and r.data.tags["sftkey.arm"] == "sft_tag")
    assert [m.step for m in client.get_metric_history(stage1.info.run_id, "loss")] == list(range(1, 61))
    base = weights_identity(stage1.data.params["model"])  # the weights the stage trained from, named in MLflow
    assert {k: stage1.data.params[k] for k in ("model.source", "model.weights_sha256", "model.description")} == {
        "model.source": "folder", "model.weights_sha256": base["weights_sha256"], "model.description": base["description"]}
    bench = next(r for r in children if r.data.tags[ASSET_TAG] == "benchmark_scores")
    assert {"strict_accuracy", "format_accuracy", "composite"} <= set(bench.data.metrics)
    assert bench.data.metrics["svamp_tagged/sample_len"] == 8  # the lm-eval task ran too
    assert "svamp_tagged/exact_match_strict-match" in bench.data.metrics
    artifacts = {a.path for a in client.list_artifacts(bench.info.run_id)}
    assert artifacts == {"outcomes.json", "outputs.jsonl", "summary.json"}
    annotated = next(r for r in children if r.data.tags[ASSET_TAG] == "annotated_dataset")
    assert [a.path for a in client.list_artifacts(annotated.info.run_id)] == ["exclusions.jsonl"]


def test_lineage_walk_from_the_registered_version(smoke_run):
    from orchestration.dvc_data import DvcResource
    from sftkey.data import DataConfig, Record, content_version, load_records

    tracking = resources(smoke_run.config)["tracking"]
    client = tracking.client()
    assert str(version_by_alias(client, "sftkey-smoke", CHAMPION).version) == "1"  # the first candidate
    lineage = walk_lineage(client, "sftkey-smoke", "1")
    assert (lineage.pipeline_run_id, lineage.pipeline_run_name) == (smoke_run.result.parent_run_id,
                                                                    smoke_run.result.pipeline_run)
    run = client.get_run(lineage.run_id)
    assert (run.data.tags[ASSET_TAG], run.data.tags["sftkey.arm"], run.data.tags["sftkey.stage"]) == (
        "stage2_model", "sftkey_tag", "stage2")
    assert lineage.config["train.lr"] == "0.01"
    assert lineage.config["data.limit"] == "64"
    assert json.loads(lineage.config["arms.sftkey_tag.stages"])[1]["loss"] == "key"
    records, _ = load_records(DataConfig("svamp", "train", limit=64))
    assert lineage.data_version == content_version(records)
    dvc = resources(smoke_run.config)["dvc"]
    assert isinstance(dvc, DvcResource)
    text = dvc.read_text("raw/svamp-train.jsonl", lineage.dvc_rev)
    assert content_version([Record(**json.loads(line)) for line in text.splitlines()]) == lineage.data_version
    assert lineage.tags["promotion.decision"] == "promoted"
    assert lineage_lines(lineage)[0] == f"sftkey-smoke v1 <- run {lineage.run_id}"
    version = client.get_model_version("sftkey-smoke", "1")
    assert version.source.startswith("models:/m-")  # a logged MLflow transformers model
    # served as scored: the logged weights are in the dtype the benchmark scored them in (the gate checks it)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    scored = json.loads(version.tags["sftkey.benchmark"])["dtype"]
    assert (scored, logged.tags["sftkey.weights_dtype"], version.tags["sftkey.weights_dtype"]) == ("float32",) * 3


def test_the_champion_served_through_mlflow_answers_as_it_was_scored(smoke_run):
    """The registered model, loaded as users load it, gives the benchmark's questions the outputs the benchmark
    scored, word for word: same weights and dtype, same prompt, same new-token cap (a served cap longer than the
    scored one would extend every answer the cap cut)."""
    import mlflow

    from sftkey.data import DataConfig
    from sftkey.evaluate import OUTPUTS, gold_records

    tracking = resources(smoke_run.config)["tracking"]
    client = tracking.client()
    version = version_by_alias(client, "sftkey-smoke", CHAMPION)
    arm, seed = version.tags["sftkey.arm"], version.tags["sftkey.seed"]
    record = smoke_run.result.comparison["records"][f"{arm}|{seed}"]
    scored = {row["uid"]: row for row in map(json.loads, Path(record["folder"], OUTPUTS).read_text().splitlines())}
    bench = smoke_run.config.benchmark
    questions, _ = gold_records(DataConfig(bench.dataset, bench.split, limit=bench.limit, seed=bench.seed,
                                           test_fraction=bench.test_fraction))
    assert {q.uid for q in questions} == scored.keys()
    mlflow.set_tracking_uri(tracking.resolve_uri())
    served = mlflow.pyfunc.load_model(f"models:/sftkey-smoke@{CHAMPION}")
    summary = json.loads(Path(record["folder"], "summary.json").read_text())
    assert served.model_config["max_new_tokens"] == summary["max_new_tokens"] == 40  # the smoke config's cap
    assert served.predict([q.question for q in questions]) == [scored[q.uid]["output"] for q in questions]
    from sftkey.models import load_tokenizer

    tokenizer = load_tokenizer(record["checkpoint"])
    shorter = mlflow.pyfunc.load_model(f"models:/sftkey-smoke@{CHAMPION}", model_config={"max_new_tokens": 2})
    (short,) = shorter.predict([questions[0].question])  # a caller may serve it with another cap
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2


def test_rerun_reuses_every_checkpoint_and_keeps_its_own_outputs(smoke_run):
    from orchestration.pipeline import run_pipeline

    first = smoke_run.result
    stamps = {p: p.stat().st_mtime_ns for p in Path(smoke_run.config.work_dir, "store", "models").rglob("sftkey.json")}
    second = run_pipeline(smoke_run.config, echo=lambda line: None, instance=smoke_run.instance)
    for cell in CELLS:
        assert latest_metadata(smoke_run.instance, "stage1_model", cell)["status"] == "reused"
    assert latest_metadata(smoke_run.instance, "stage2_model", "sftkey_tag|0")["status"] == "reused"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no checkpoint rewritten
    assert second.run_dir != first.run_dir
    assert Path(first.comparison["folder"], "comparison.md").read_text() == first.comparison["table"]
    # The same weights on the same benchmark: registration reuses version 1 (the champion), adds none.
    assert (second.registered["version"], second.registered["reused"]) == ("1", True)
    assert (second.promoted, second.promotion_reason) == (True, "version 1 is already the champion")
    assert second.decision["promotion.decision"] == "promoted"  # its first decision and evidence are kept
    client = resources(smoke_run.config)["tracking"].client()
    assert str(version_by_alias(client, "sftkey-smoke", CHAMPION).version) == "1"
    assert len(client.search_model_versions("name = 'sftkey-smoke'")) == 1


def test_a_crashed_stage_resumes_from_its_checkpoint(smoke_run, monkeypatch, caplog):
    """A stage that dies after its first periodic checkpoint continues from it when re-materialized."""
    import logging

    import sftkey.train.trainer as trainer
    from orchestration.definitions import DATA_ASSETS, pipeline_graph

    raw = json.loads(json.dumps(smoke_run.raw))
    raw["training"]["arms"]["sft_tag"]["stages"][0]["steps"] = 30  # a new stage key: it must train
    config = pipeline_config_from_dict(raw)
    res = resources(config, "crash-test")
    assets, checks = pipeline_graph(config)
    graph = assets + checks
    stage1 = [a for a in assets if a.key == asset_key("stage1_model", "sft_tag|0")]
    assert dg.materialize(graph, selection=DATA_ASSETS, instance=smoke_run.instance, resources=res).success

    original = trainer.StageRecipe.save

    def crash_after_first_periodic_checkpoint(*args, final, **kwargs):
        folder = original(*args, final=final, **kwargs)
        if not final:
            raise RuntimeError("injected crash")
        return folder

    monkeypatch.setattr(trainer.StageRecipe, "save", crash_after_first_periodic_checkpoint)
    crashed = dg.materialize(graph, selection=stage1, instance=smoke_run.instance, resources=res,
                             raise_on_error=False)
    assert not crashed.success
    monkeypatch.setattr(trainer.StageRecipe, "save", original)
    with caplog.at_level(logging.INFO, logger="sftkey.train"):
        resumed = dg.materialize(graph, selection=stage1, instance=smoke_run.instance, resources=res)
    assert resumed.success
    assert "stage stage1: resuming at step 20 from " in caplog.text
    output = resumed.output_for_node(stage1[0].op.name)
    meta = json.loads(Path(output["checkpoint"], "sftkey.json").read_text())
    assert (output["status"], meta["step"], meta["final"]) == ("trained", 30, True)
    assert [step for step, _ in output["losses"]] == list(range(1, 31))  # the log continues, no gap, no repeat
    tracking = res["tracking"]
    runs = tracking.client().search_runs([tracking.experiment_id()], "tags.`dagster.asset` = 'stage1_model' and "
                                         f"tags.`sftkey.stage_key` = '{output['key']}'")
    assert sorted(run.info.status for run in runs) == ["FAILED", "FINISHED"]


def test_unreachable_mlflow_fails_before_any_work(smoke_run, tmp_path):
    from orchestration.pipeline import run_pipeline
    from orchestration.tracking import TrackingUnavailable

    raw = json.loads(json.dumps(smoke_run.raw))
    raw.update(work_dir=str(tmp_path / "work"), tracking={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(TrackingUnavailable, match="did not answer"):
        run_pipeline(pipeline_config_from_dict(raw), echo=lambda line: None, instance=smoke_run.instance)
    assert not (tmp_path / "work" / "store").exists()


def test_the_data_assets_read_the_source_once(smoke_run, tmp_path, monkeypatch):
    """raw_dataset loads the records; annotated_dataset reads raw_dataset's DVC revision; tokenized_dataset tokenizes
    annotated_dataset's records: one read of the source per run, in a fresh work dir (nothing to reuse)."""
    import sftkey.data.sources as sources
    from orchestration.definitions import DATA_ASSETS, pipeline_graph

    reads = []
    native_rows = sources.native_rows

    def counted(*args, **kwargs):
        reads.append(args[0].dataset)
        return native_rows(*args, **kwargs)

    monkeypatch.setattr(sources, "native_rows", counted)
    raw = json.loads(json.dumps(smoke_run.raw))
    raw["work_dir"] = str(tmp_path / "work")
    config = pipeline_config_from_dict(raw)
    assets, checks = pipeline_graph(config)
    result = dg.materialize(assets + checks, selection=DATA_ASSETS, instance=smoke_run.instance,
                            resources=resources(config, "read-once"))
    assert reads == ["svamp"]
    tokenized = result.output_for_node("tokenized_dataset")
    annotated = result.output_for_node("annotated_dataset")
    assert tokenized["data_version"] == annotated["data_version"]
    tagged = tokenized["formats"]["tagged"]
    assert (tagged["annotated"], tagged["kept"], tagged["too_long"]) == (64, 62, 2)  # 2 over max_length 256
    prepared = Path(tagged["folder"], "records.jsonl").read_text().splitlines()
    assert set(prepared) < set(Path(annotated["folder"], "records.jsonl").read_text().splitlines())  # those records


def test_only_the_candidate_is_logged_as_a_model(smoke_run):
    client = resources(smoke_run.config)["tracking"].client()
    tracking = resources(smoke_run.config)["tracking"]
    models = client.search_logged_models(experiment_ids=[tracking.experiment_id()])
    assert [model.name for model in models] == ["sftkey_tag-seed0"]  # the promotion candidate, first seed
    records = smoke_run.result.comparison["records"]
    assert records["sft_tag|0"]["model_uri"] is None
    assert records["sftkey_tag|0"]["model_uri"] == f"models:/{models[0].model_id}"
