"""The regression run: its report on fixed numbers, then `sftkey regress` for real on the smoke pipeline: it passes
on a baseline recorded from a good run and fails, with a readable report, on a deliberately degraded model."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from orchestration.regress import BaselineError, MetricCheck, checks_against, read_baseline, report_lines

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
    baseline = read_baseline(PROJECT / "benchmarks" / "baseline_regress.json")
    config = yaml.safe_load((PROJECT / "configs" / "regress_cpu.yaml").read_text())
    assert baseline["config"] == "configs/regress_cpu.yaml"
    assert sorted(baseline["metrics"]) == sorted(config["training"]["arms"])
    assert baseline["metrics"]["sft_tag"]["format_accuracy"] > 0.5  # what the tiny model learns there


def regress(config: Path, baseline: Path, write: bool = False) -> int:
    from orchestration.commands import regress as command

    args = argparse.Namespace(config=str(config), baseline=str(baseline), work_dir=None, no_champion=False,
                              write_baseline=str(baseline) if write else None)
    return command.run(args)


def test_regress_passes_on_its_baseline_and_fails_on_a_degraded_model(smoke_run, tmp_path, monkeypatch, capsys):
    from orchestration.commands import regress as command

    monkeypatch.setenv("DAGSTER_HOME", str(Path(smoke_run.config.work_dir) / "dagster"))
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"tolerance": {"format_accuracy": 0.1}, "metrics": {}}))
    assert regress(smoke_run.config_path, baseline, write=True) == 0  # the smoke run's models: reused
    recorded = json.loads(baseline.read_text())
    assert recorded["tolerance"] == {"format_accuracy": 0.1}
    assert recorded["metrics"]["sft_tag"]["format_accuracy"] > 0.5

    assert regress(smoke_run.config_path, baseline) == 0
    report = capsys.readouterr().out
    assert "| champion v1 | sftkey_tag | format_accuracy |" in report
    assert report.rstrip().endswith("metrics at or above their baseline.")

    degraded = json.loads(json.dumps(smoke_run.raw))
    degraded["training"]["arms"]["sft_tag"]["stages"][0]["steps"] = 2  # far too short to learn the template
    path = tmp_path / "degraded.yaml"
    path.write_text(yaml.safe_dump(degraded))
    assert regress(path, baseline) == 1
    report = capsys.readouterr().out
    assert "| sft_tag | format_accuracy |" in report and "| REGRESSION |" in report
    assert "FAILED: " in report and "sft_tag format_accuracy " in report
    assert command.DEFAULT_CONFIG == "configs/regress_cpu.yaml"
