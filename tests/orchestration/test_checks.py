"""The benchmark checks called as plain functions: where each must say no, and the plain arm's n/a."""

import dagster as dg

from orchestration.checks import check_benchmark_scores_format_accuracy, check_benchmark_scores_length_cap
from orchestration.config import FormatCheckConfig


def scores(length_cap_share: float, format_accuracy: float | None = 0.5) -> dict:
    return {"metrics": {"length_cap_share": length_cap_share, "format_accuracy": format_accuracy},
            "max_new_tokens": 128, "warnings": ["40% of the answers hit the cap of 128 new tokens"]}


def test_length_cap_check_warns_above_five_percent():
    at_limit = check_benchmark_scores_length_cap(scores(0.05))
    assert at_limit.passed and at_limit.metadata["length_cap_share"].value == 0.05
    over = check_benchmark_scores_length_cap(scores(0.4))
    assert not over.passed
    assert over.severity == dg.AssetCheckSeverity.WARN  # a floor on accuracy, not a broken run
    assert over.description == "40% of the answers hit the cap of 128 new tokens"
    assert over.metadata["max_new_tokens"].value == 128


def test_format_check_refuses_below_the_minimum_and_skips_the_plain_arm():
    config = FormatCheckConfig(min_format_accuracy=0.6)
    assert not check_benchmark_scores_format_accuracy(config, scores(0.0, 0.5)).passed
    assert check_benchmark_scores_format_accuracy(config, scores(0.0, 0.6)).passed
    plain = check_benchmark_scores_format_accuracy(config, scores(0.0, None))
    assert plain.passed and plain.description == "n/a: untagged (plain) arm"
