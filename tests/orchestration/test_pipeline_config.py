"""The pipeline YAML: what it becomes (Dagster run config, resources) and errors that name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestration.config import default_tracking_uri, load_pipeline_config, resources, run_config
from orchestration.definitions import ALL_ASSETS, DATA_ASSETS, op_config_for
from sftkey.data import DataConfig
from sftkey.train.config import ConfigError

PROJECT = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = PROJECT / "configs" / "pipeline_smoke.yaml"
SHARED_SVAMP = PROJECT.parent / "shared" / "data" / "svamp" / "SVAMP.json"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


SHIPPED = ["pipeline_smoke.yaml", "pipeline_demo.yaml", "regress_cpu.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    config = load_pipeline_config(PROJECT / "configs" / name)
    assert config.arms == ["sft_tag", "sftkey_tag"]
    assert (config.baseline_arm, config.candidate_arm) == ("sft_tag", "sftkey_tag")
    assert config.seeds == [0]


def test_run_config_has_an_entry_for_every_step_of_the_graph(tmp_path):
    config = load_pipeline_config(SMOKE_CONFIG, {"work_dir": str(tmp_path)})
    ops = run_config(config)
    assert op_config_for(ops, ALL_ASSETS) == ops  # no entry that the graph would reject
    assert sorted(op_config_for(ops, DATA_ASSETS)["ops"]) == [
        "annotated_dataset", "annotated_dataset_check_annotated_dataset_coverage", "raw_dataset", "tokenized_dataset"]
    assert ops["ops"]["stage1_model"]["config"]["training"]["model"] == "tiny"
    assert ops["ops"]["registered_model"]["config"] == {"model_name": "sftkey-smoke", "candidate_arm": "sftkey_tag",
                                                       "candidate_seed": 0}
    assert default_tracking_uri(config) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    res = resources(config, "run-1", "parent-1")
    assert res["store"].run_dir == str(tmp_path / "runs" / "run-1")
    assert res["tracking"].parent_run_id == "parent-1"
    assert res["dvc"].repo == str(tmp_path / "dvc" / "repo")


def test_unknown_pipeline_key_names_file_and_line(tmp_path):
    text = SMOKE_CONFIG.read_text().replace("checks: {", "checks: {min_coverage: 0.5, ")
    path = write(tmp_path, text)
    line = text.splitlines().index(next(l for l in text.splitlines() if l.startswith("checks:"))) + 1
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(path)
    assert str(error.value).startswith(f"{path} line {line}: checks.min_coverage: unknown key; did you mean "
                                       "'min_annotation_coverage'?")


def test_bad_training_value_names_file_and_line(tmp_path):
    text = SMOKE_CONFIG.read_text().replace("lr: 1.0e-2,", "lr: -1,")
    path = write(tmp_path, text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "lr: -1" in l)
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: train\.lr: learning rate must be a finite number > 0"):
        load_pipeline_config(path)


def test_benchmark_on_the_training_data_is_refused(tmp_path):
    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["benchmark"]["split"] = "train"
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"benchmark.split: the benchmark \(svamp train .*\) can share questions "
                                          r"with the training data \(svamp train .*\); answer held-out questions"):
        load_pipeline_config(path)
    raw["benchmark"]["split"] = "all"  # the whole data set holds the training half
    with pytest.raises(ConfigError, match="can share questions with the training data"):
        load_pipeline_config(write(tmp_path, yaml.safe_dump(raw)))


def test_benchmark_takes_the_training_datas_carve(tmp_path):
    """Training on SVAMP's train half carved with seed 1: the benchmark's test half is carved with seed 1 too,
    whatever the benchmark section says (with seed 0, 195 of the 303 test questions would be training questions)."""
    from orchestration.config import benchmark_config, benchmark_data
    from sftkey.data import can_share_records, load_records, shared_uids

    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["training"]["data"] = {"dataset": "svamp", "split": "train", "seed": 1, "test_fraction": 0.25, "max_length": 256}
    raw["benchmark"] |= {"seed": 0, "limit": None}
    config = load_pipeline_config(write(tmp_path, yaml.safe_dump(raw)))
    bench = benchmark_config(config)
    assert (bench.dataset, bench.split, bench.seed, bench.test_fraction) == ("svamp", "test", 1, 0.25)
    assert run_config(config)["ops"]["benchmark_scores"]["config"]["seed"] == 1
    training = DataConfig("svamp", "train", seed=1, test_fraction=0.25)
    assert not can_share_records(training, benchmark_data(bench))
    if not SHARED_SVAMP.is_file():
        pytest.skip(f"{SHARED_SVAMP} is absent: the record-level check needs the real SVAMP")
    questions = load_records(benchmark_data(bench))[0]
    assert len(questions) > 200 and not shared_uids(training, load_records(training)[0], benchmark_data(bench), questions)


def test_unknown_candidate_arm_is_refused(tmp_path):
    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["promotion"]["candidate_arm"] = "key_tag"
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"promotion.candidate_arm: 'key_tag' is not an arm of training.arms "
                                          r"\(sft_tag, sftkey_tag\)"):
        load_pipeline_config(path)


def test_missing_file_says_where_the_format_is(tmp_path):
    with pytest.raises(ConfigError, match=r"no such pipeline config \(see configs/pipeline_demo.yaml"):
        load_pipeline_config(tmp_path / "nope.yaml")


def test_commands_report_a_bad_config_and_exit_2(tmp_path, capsys):
    from sftkey.cli import main

    path = write(tmp_path, SMOKE_CONFIG.read_text().replace("name: smoke", "name: smoke\nnmae: typo"))
    for command in ("pipeline", "ui", "regress"):
        assert main([command, "--config", str(path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == f"sftkey pipeline: error: {path} line 5: nmae: unknown key; did you mean 'name'? known " \
                        "keys: name, work_dir, benchmark, checks, promotion, tracking, dvc, compute"
    assert errors[1].startswith(f"sftkey ui: error: {path} line 5: nmae: unknown key")
    assert errors[2].startswith(f"sftkey regress: error: {path} line 5: nmae: unknown key")
    assert len(errors) == 3  # one line each, no traceback


def test_bad_benchmark_key_names_file_and_line(tmp_path):
    text = SMOKE_CONFIG.read_text().replace("benchmark: {dataset: svamp,", "benchmark: {dataset: svamp, limt: 3,")
    path = write(tmp_path, text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("benchmark:"))
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: benchmark.limt: unknown key; known keys: dataset, "):
        load_pipeline_config(path)
    path = write(tmp_path, SMOKE_CONFIG.read_text().replace("limit: 16,", "limit: many,"))
    with pytest.raises(ConfigError, match=r"benchmark.limit: Input should be a valid integer"):
        load_pipeline_config(path)
