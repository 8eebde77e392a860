"""The regression run: its report on fixed numbers, the refusal of every baseline that could not fail, then
`sftkey regress` for real on the smoke pipeline (passes on its baseline, fails on a degraded model), a warm work
dir that must not hide swapped weights or changed code, and the committed regression config damaged on purpose."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from orchestration.regress import (
    REGRESSION_METRICS, BaselineError, MetricCheck, checks_against, read_baseline, regressible, report_lines,
    require_every_arm, write_baseline,
)

PROJECT = Path(__file__).resolve().parents[2]


def test_checks_and_report_on_fixed_numbers():
    baseline = {"sft_tag": {"format_accuracy": 0.75, "strict_accuracy": 0.125}}
    measured = {"sft_tag": {"format_accuracy": 0.5, "strict_accuracy": 0.125, "composite": 0.2375}}
    checks = checks_against("file b.json", baseline, measured, {"format_accuracy": 0.125})
    assert checks == [MetricCheck("file b.json", "sft_tag", "format_accuracy", 0.75, 0.5, 0.125),
                      MetricCheck("file b.json", "sft_tag", "strict_accuracy", 0.125, 0.125, 0.0)]
    assert [c.passed for c in checks] == [False, True]
    lines = report_lines(checks)
    assert lines[2] == "| file b.json | sft_tag | format_accuracy | 0.7500 | 0.5000 | 0.1250 | REGRESSION |"
    assert lines[3] == "| file b.json | sft_tag | strict_accuracy | 0.1250 | 0.1250 | 0.0000 | ok |"
    assert lines[-1] == ("\nFAILED: 1 of 2 metrics fell below their baseline: "
                         "sft_tag format_accuracy 0.5000 < 0.7500 - 0.1250 (file b.json)")


def test_baseline_for_an_arm_the_run_lacks_is_an_error():
    with pytest.raises(BaselineError, match=r"has arm 'key_tag', which this run does not train \(sft_tag\)"):
        checks_against("file b.json", {"key_tag": {"composite": 0.1}}, {"sft_tag": {"composite": 0.1}}, {})


def test_missing_baseline_file_says_how_to_make_one(tmp_path):
    with pytest.raises(BaselineError, match="--write-baseline"):
        read_baseline(tmp_path / "none.json")


def test_committed_baseline_matches_the_regression_config():
    baseline = read_baseline(PROJECT / "benchmarks" / "baseline_regress.json")  # refused if it could not fail
    config = yaml.safe_load((PROJECT / "configs" / "regress_cpu.yaml").read_text())
    assert baseline["config"] == "configs/regress_cpu.yaml"
    assert sorted(baseline["metrics"]) == sorted(config["training"]["arms"])
    for arm, metrics in baseline["metrics"].items():
        assert sorted(metrics) == sorted(REGRESSION_METRICS), arm  # every metric of every arm is checked
        for metric, value in metrics.items():  # each can regress, with room for machine noise below it
            assert value >= 2 * baseline["tolerance"][metric] > 0, (arm, metric)


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


def baseline_file(tmp_path: Path, tolerance: dict, metrics: dict) -> Path:
    return write_json(tmp_path / "baseline.json", {"tolerance": tolerance, "metrics": metrics})


def test_a_tolerance_at_or_above_its_baseline_value_is_refused(tmp_path):
    # Yesterday's committed baseline: strict accuracy 0.0625 with tolerance 0.07 passes whatever is measured.
    path = baseline_file(tmp_path, {"strict_accuracy": 0.07}, {"sft_tag": {"strict_accuracy": 0.0625}})
    with pytest.raises(BaselineError) as refused:
        read_baseline(path)
    assert str(refused.value) == (
        f"{path}: arm 'sft_tag' metric 'strict_accuracy' has tolerance 0.07 >= its baseline 0.0625, so it can never "
        "regress; set its tolerance below 0.0625, or record the baseline from a run that scores clearly above 0.07")
    equal = baseline_file(tmp_path, {"composite": 0.25}, {"sft_tag": {"composite": 0.25}})
    with pytest.raises(BaselineError, match=r"'composite' has tolerance 0.25 >= its baseline 0.25"):
        read_baseline(equal)
    zero = baseline_file(tmp_path, {}, {"sft_tag": {"format_accuracy": 0.0}})  # default tolerance 0, value 0
    with pytest.raises(BaselineError, match=r"'format_accuracy' has tolerance 0 >= its baseline 0,"):
        read_baseline(zero)
    ok = baseline_file(tmp_path, {"composite": 0.24}, {"sft_tag": {"composite": 0.25}})
    assert read_baseline(ok)["metrics"] == {"sft_tag": {"composite": 0.25}}


@pytest.mark.parametrize("tolerance, metrics, message", [
    ({}, {}, "no arms under `metrics`, so nothing would be checked; record it again"),
    ({}, None, "no arms under `metrics`"),
    ({}, {"sft_tag": {}}, "arm 'sft_tag' has no metrics, so nothing of it would be checked"),
    ({}, {"sft_tag": {"lenient_accuracy": 0.5}}, "arm 'sft_tag' metric 'lenient_accuracy' is not one of "
                                                 "strict_accuracy, format_accuracy, composite"),
    ({"composite": -0.1}, {"sft_tag": {"composite": 0.5}}, "tolerance 'composite' is -0.1, not a finite number >= 0"),
    ({"composite": float("nan")}, {"sft_tag": {"composite": 0.5}}, "tolerance 'composite' is NaN, not a finite"),
    ({}, {"sft_tag": {"composite": float("nan")}}, "arm 'sft_tag' metric 'composite' is NaN, not a finite number"),
    ({}, {"sft_tag": {"composite": -0.5}}, "arm 'sft_tag' metric 'composite' is -0.5, not a finite number >= 0"),
    ({}, {"sft_tag": {"composite": True}}, "arm 'sft_tag' metric 'composite' is true, not a finite number"),
    ({}, {"sft_tag": {"composite": "0.5"}}, "arm 'sft_tag' metric 'composite' is \"0.5\", not a finite number"),
    ({}, {"sft_tag": {"composite": 1.5}}, "arm 'sft_tag' metric 'composite' is 1.5, above 1 (a share)"),
    ({"loss": 0.1}, {"sft_tag": {"composite": 0.5}}, "tolerance of 'loss', which is not one of"),
    ([0.1], {"sft_tag": {"composite": 0.5}}, "`tolerance` must map metric -> number, got [0.1]"),
])
def test_a_baseline_that_cannot_fail_is_refused(tmp_path, tolerance, metrics, message):
    path = baseline_file(tmp_path, tolerance, metrics)
    with pytest.raises(BaselineError) as refused:
        read_baseline(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)
    with pytest.raises(BaselineError):  # the same rules for the champion's metrics and an in-memory baseline
        checks_against("champion v1", metrics, {"sft_tag": {m: 0.9 for m in REGRESSION_METRICS}}, tolerance)


def test_unreadable_baseline_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(BaselineError, match=r"a.json line 1: not valid JSON"):
        read_baseline(tmp_path / "a.json")
    (tmp_path / "b.json").write_bytes(b'{"metrics": "\xff"}')
    with pytest.raises(BaselineError, match=r"b.json: not UTF-8 text \(byte 13\)"):
        read_baseline(tmp_path / "b.json")
    with pytest.raises(BaselineError, match=r"c.json: a JSON object with `tolerance` and `metrics` expected, got list"):
        read_baseline(write_json(tmp_path / "c.json", [1]))


def test_write_baseline_refuses_a_baseline_that_could_not_fail_and_writes_nothing(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "baseline.json"
    config = SimpleNamespace(path="configs/regress_cpu.yaml")
    measured = {"sft_tag": {"strict_accuracy": 0.0625, "format_accuracy": 0.6, "composite": 0.25}}
    with pytest.raises(BaselineError) as refused:
        write_baseline(path, config, measured, {"strict_accuracy": 0.07, "format_accuracy": 0.1, "composite": 0.1})
    assert str(refused.value).startswith(f"{path} (not written): arm 'sft_tag' metric 'strict_accuracy' has "
                                         "tolerance 0.07 >= its baseline 0.0625")
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no temp file either
    write_baseline(path, config, measured, {"strict_accuracy": 0.03})
    assert read_baseline(path)["metrics"] == measured


def test_champion_metrics_that_cannot_regress_are_left_out_with_a_note():
    champion = {"sftkey_tag": {"strict_accuracy": 0.0, "format_accuracy": 0.6, "composite": 0.1}}
    kept, notes = regressible(champion, {"format_accuracy": 0.1, "composite": 0.1})
    assert kept == {"sftkey_tag": {"format_accuracy": 0.6}}
    assert notes == ["sftkey_tag strict_accuracy 0.0000 <= tolerance 0.0000",
                     "sftkey_tag composite 0.1000 <= tolerance 0.1000"]
    assert regressible({"?": {}}, {}) == ({}, ["?: no metric tags"])


def test_a_baseline_missing_an_arm_the_config_trains_is_refused():
    with pytest.raises(BaselineError, match=r"^file b.json: no baseline for arm 'sftkey_tag', which the config "
                                            r"trains; record it again"):
        require_every_arm("file b.json", {"sft_tag": {"composite": 0.5}}, ["sft_tag", "sftkey_tag"])
    require_every_arm("file b.json", {"sft_tag": {"composite": 0.5}}, ["sft_tag"])


def test_sftkey_regress_refuses_a_baseline_that_cannot_fail_in_one_line_before_training(tmp_path, capsys):
    from sftkey.cli import main

    path = baseline_file(tmp_path, {"strict_accuracy": 0.07}, {"sft_tag": {"strict_accuracy": 0.0625},
                                                               "sftkey_tag": {"strict_accuracy": 0.1}})
    work = tmp_path / "work"
    code = main(["regress", "--config", str(PROJECT / "configs" / "regress_cpu.yaml"), "--baseline", str(path),
                 "--work-dir", str(work)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == (f"sftkey regress: error: {path}: arm 'sft_tag' metric 'strict_accuracy' has tolerance "
                            "0.07 >= its baseline 0.0625, so it can never regress; set its tolerance below 0.0625, or "
                            "record the baseline from a run that scores clearly above 0.07\n")
    assert not work.exists()  # refused before any work


def regress(config: Path, baseline: Path, work_dir: str | None = None, no_champion: bool = False) -> int:
    from orchestration.commands import regress as command

    args = argparse.Namespace(config=str(config), baseline=str(baseline), work_dir=work_dir, no_champion=no_champion,
                              write_baseline=None)
    return command.run(args)


# slow: CI's `sftkey regress` run covers the same path on every change
@pytest.mark.slow
def test_regress_passes_on_its_baseline_and_fails_on_a_degraded_model(smoke_run, tmp_path, monkeypatch, capsys):
    from orchestration.commands import regress as command
    from orchestration.regress import measured_metrics

    monkeypatch.setenv("DAGSTER_HOME", str(Path(smoke_run.config.work_dir) / "dagster"))
    # The smoke run's SFT-Tag learns the template, not the answers: both arms here are its stage 1 (reused, not
    # trained again), checked on format accuracy only (a strict accuracy near 0 could not regress: refused).
    measured = measured_metrics(smoke_run.result)["sft_tag"]
    assert measured["format_accuracy"] > 0.5
    same = json.loads(json.dumps(smoke_run.raw))
    arms = same["training"]["arms"]
    arms["sftkey_tag"]["stages"] = json.loads(json.dumps(arms["sft_tag"]["stages"]))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(same))
    baseline = baseline_file(tmp_path, {"format_accuracy": 0.1},
                             {arm: {"format_accuracy": measured["format_accuracy"]} for arm in arms})
    assert regress(good, baseline, no_champion=True) == 0
    report = capsys.readouterr().out
    assert f"| file {baseline} | sftkey_tag | format_accuracy | {measured['format_accuracy']:.4f} | " in report
    assert report.rstrip().endswith("PASSED: all 2 metrics at or above their baseline.")

    arms["sft_tag"]["stages"] = [{"name": "stage1", "loss": "sft", "steps": 2}]  # far too short to learn the template
    degraded = tmp_path / "degraded.yaml"
    degraded.write_text(yaml.safe_dump(same))
    assert regress(degraded, baseline, no_champion=True) == 1
    report = capsys.readouterr().out
    assert "| sft_tag | format_accuracy |" in report and "| REGRESSION |" in report
    assert "FAILED: 1 of 2 metrics fell below their baseline: sft_tag format_accuracy " in report
    assert command.DEFAULT_CONFIG == "configs/regress_cpu.yaml"


def materialize(smoke_run, raw: dict, names: list[str]):
    """Materialize `names` (the sft_tag|0 cell's for a cell asset) of the config `raw` in the smoke run's instance and
    work dir; one pipeline-run folder, so each call loads the inputs the previous one stored."""
    import dagster as dg

    from orchestration.config import pipeline_config_from_dict, resources
    from orchestration.definitions import pipeline_graph

    config = pipeline_config_from_dict(raw)
    assets, checks = pipeline_graph(config)
    selection = [a for a in assets if a.key.path[-1] in names and a.key.path[0] in ("sft_tag", a.key.path[-1])]
    result = dg.materialize(assets + checks, selection=selection,
                            instance=smoke_run.instance, resources=resources(config, "warm-test"))
    assert result.success
    return CellOutputs(result)


class CellOutputs:
    """A materialization's outputs by asset name: the data assets', or the sft_tag|0 cell's."""

    def __init__(self, result):
        self.result = result

    def output_for_node(self, name: str):
        from orchestration.assets import CELL_ASSETS, cell_key

        node = cell_key("sft_tag", 0, name).to_python_identifier() if name in CELL_ASSETS else name
        return self.result.output_for_node(node)


@pytest.mark.slow
def test_warm_work_dir_rescores_swapped_weights_and_retrains_under_other_code(smoke_run, monkeypatch):
    """Reuse must never hide a change: weights swapped in a finished checkpoint are scored again, and another code
    version trains again, though the config, data and base weights are the same."""
    from safetensors.torch import load_file, save_file

    from sftkey import version

    raw = json.loads(json.dumps(smoke_run.raw))
    raw["training"]["arms"]["sft_tag"]["stages"][0]["steps"] = 4  # a stage of its own in the smoke work dir
    raw["benchmark"] |= {"limit": 4, "lm_eval_tasks": []}
    data = ["raw_dataset", "annotated_dataset", "tokenized_dataset"]
    materialize(smoke_run, raw, data)
    models = ["stage1_model", "stage2_model", "benchmark_scores"]
    first = materialize(smoke_run, raw, models)
    scored = first.output_for_node("benchmark_scores")
    again = materialize(smoke_run, raw, models)
    assert again.output_for_node("stage1_model")["status"] == "reused"
    assert again.output_for_node("benchmark_scores")["folder"] == scored["folder"]  # unchanged: scores reused

    weights = Path(scored["checkpoint"]) / "model.safetensors"
    tensors = load_file(weights)
    save_file({name: tensor * 0.5 for name, tensor in tensors.items()}, weights, metadata={"format": "pt"})
    swapped = materialize(smoke_run, raw, models)
    assert swapped.output_for_node("stage1_model")["status"] == "reused"  # same stage key: the swapped file
    rescored = swapped.output_for_node("benchmark_scores")
    assert rescored["folder"] != scored["folder"]  # other weights: scored again, in a folder of their own
    assert len((Path(rescored["folder"]) / "outputs.jsonl").read_text().splitlines()) == 4

    monkeypatch.setattr(version, "code_version", lambda: "sftkey 0.1.0 git 0123abcd dirty 00ff")
    materialize(smoke_run, raw, data)
    other_code = materialize(smoke_run, raw, models)
    stage = other_code.output_for_node("stage1_model")
    assert stage["status"] == "trained" and stage["key"] != scored["stage_keys"][0]
    assert other_code.output_for_node("benchmark_scores")["folder"] not in (scored["folder"], rescored["folder"])


@pytest.mark.slow
def test_the_committed_gate_fails_a_damaged_training_on_every_metric(tmp_path, monkeypatch, capsys):
    """configs/regress_cpu.yaml with stage 1 cut from 300 steps to 5 (a trainer that stopped learning): every
    metric of every arm falls below benchmarks/baseline_regress.json, and `sftkey regress` exits 1 (~1 minute)."""
    raw = yaml.safe_load((PROJECT / "configs" / "regress_cpu.yaml").read_text())
    raw["work_dir"] = str(tmp_path / "work")
    for arm in raw["training"]["arms"].values():
        arm["stages"][0]["steps"] = 5
    damaged = tmp_path / "damaged.yaml"
    damaged.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(PROJECT)  # the config's data path is relative to the project
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert regress(damaged, PROJECT / "benchmarks" / "baseline_regress.json", no_champion=True) == 1
    report = capsys.readouterr().out
    rows = [line for line in report.splitlines() if line.startswith("| file ")]
    assert len(rows) == 6 and all(row.endswith("| REGRESSION |") for row in rows)
    assert "FAILED: 6 of 6 metrics fell below their baseline" in report
