"""The pipeline YAML: what it becomes (typed sections, resources) and errors that name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestration.config import BenchmarkSection, PipelineSettings, default_tracking_uri, load_pipeline_config, resources
from sftkey.config_file import ConfigError
from sftkey.data import DataConfig

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


def test_one_settings_resource_carries_every_section(tmp_path):
    config = load_pipeline_config(SMOKE_CONFIG, {"work_dir": str(tmp_path)})
    res = resources(config, "run-1", "parent-1")
    settings = res["settings"]
    assert isinstance(settings, PipelineSettings) and settings.path == str(SMOKE_CONFIG)
    parsed = settings.config  # what every asset reads: parsed once per process
    assert parsed is settings.config
    assert (parsed.training.model, parsed.work_dir, parsed.candidate_arm, parsed.candidate_seed) == (
        "tiny", tmp_path, "sftkey_tag", 0)
    assert parsed.benchmark == BenchmarkSection("svamp", "test", limit=16, max_new_tokens=40, batch_size=16,
                                                lm_eval_tasks=["svamp_tagged"], lm_eval_limit=8)
    assert (parsed.checks.min_annotation_coverage, parsed.checks.max_too_long_share) == (0.9, 0.05)
    assert parsed.promotion.model_name == "sftkey-smoke"
    assert default_tracking_uri(config) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert res["store"].run_dir == str(tmp_path / "runs" / "run-1")
    assert res["tracking"].parent_run_id == "parent-1"
    assert res["dvc"].repo == str(tmp_path / "dvc" / "repo")
    assert (res["compute"].device, res["compute"].num_processes) == ("auto", 1)


def test_a_job_launched_from_the_ui_needs_no_run_config():
    from orchestration.definitions import build_definitions

    defs = build_definitions(load_pipeline_config(SMOKE_CONFIG))
    for name in ("sftkey_pipeline", "prepare_data_job"):
        job = defs.resolve_job_def(name)
        assert job.run_config_schema.config_type.fields["ops"].is_required is False  # nothing to fill in


def test_a_check_threshold_outside_zero_one_is_refused(tmp_path):
    text = SMOKE_CONFIG.read_text().replace("checks: {", "checks: {max_too_long_share: 5, ")
    path = write(tmp_path, text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("checks:"))
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: checks.max_too_long_share: must be a share in "
                                          r"\[0, 1\] \(annotated records dropped .*\), got 5.0$"):
        load_pipeline_config(path)


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
    from sftkey.data import can_share_records, load_records, shared_uids

    raw = yaml.safe_load(SMOKE_CONFIG.read_text())
    raw["training"]["data"] = {"dataset": "svamp", "split": "train", "seed": 1, "test_fraction": 0.25, "max_length": 256}
    raw["benchmark"] |= {"seed": 0, "limit": None}
    config = load_pipeline_config(write(tmp_path, yaml.safe_dump(raw)))
    bench = config.benchmark
    assert (bench.dataset, bench.split, bench.seed, bench.test_fraction) == ("svamp", "test", 1, 0.25)
    assert resources(config)["settings"].config.benchmark.seed == 1  # what benchmark_scores reads
    training = DataConfig("svamp", "train", seed=1, test_fraction=0.25)
    assert not can_share_records(training, bench.data())
    if not SHARED_SVAMP.is_file():
        pytest.skip(f"{SHARED_SVAMP} is absent: the record-level check needs the real SVAMP")
    questions = load_records(bench.data())[0]
    assert len(questions) > 200 and not shared_uids(training, load_records(training)[0], bench.data(), questions)


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
                        "keys: name, work_dir, benchmark, checks, promotion, tracking, dvc, dagster, compute"
    assert errors[1].startswith(f"sftkey ui: error: {path} line 5: nmae: unknown key")
    assert errors[2].startswith(f"sftkey regress: error: {path} line 5: nmae: unknown key")
    assert len(errors) == 3  # one line each, no traceback


def test_bad_benchmark_key_names_file_and_line(tmp_path):
    text = SMOKE_CONFIG.read_text().replace("benchmark: {dataset: svamp,", "benchmark: {dataset: svamp, limt: 3,")
    path = write(tmp_path, text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("benchmark:"))
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: benchmark.limt: unknown key; did you mean 'limit'\? "
                                          "known keys: dataset, "):
        load_pipeline_config(path)
    path = write(tmp_path, SMOKE_CONFIG.read_text().replace("limit: 16,", "limit: many,"))
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: benchmark.limit: expected an integer, got 'many'$"):
        load_pipeline_config(path)
