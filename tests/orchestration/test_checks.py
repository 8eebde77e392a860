"""The asset checks' rules called as plain functions: where each must say no, and where it is n/a; then the
Dagster checks themselves on plain values with the settings resource of the smoke config."""

from pathlib import Path

import dagster as dg
import pytest

from orchestration.checks import (
    gated_check_keys,
    check_benchmark_scores_format_accuracy,
    check_benchmark_scores_length_cap,
    check_stage2_model_answer_loss,
    check_tokenized_dataset_too_long,
    coverage_rule,
    loss_drop_rule,
    maximum_rule,
    minimum_rule,
    too_long_rule,
)
from orchestration.config import PipelineSettings, load_pipeline_config, resources

SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pipeline_smoke.yaml"


@pytest.fixture(scope="module")
def settings():
    return resources(load_pipeline_config(SMOKE_CONFIG))["settings"]


def test_coverage_below_the_minimum_fails():
    assert coverage_rule(9, 10, 0.9) == (True, {"coverage": 0.9, "min_coverage": 0.9})
    assert coverage_rule(8, 10, 0.9) == (False, {"coverage": 0.8, "min_coverage": 0.9})
    assert coverage_rule(0, 0, 0.0)[1]["coverage"] == 0.0  # no records: nothing covered


def test_too_many_too_long_examples_fail_in_the_worst_format():
    passed, metadata = too_long_rule({"tagged": (20, 1), "plain": (20, 2)}, 0.05)
    assert not passed
    assert metadata == {"too_long_share": 0.1, "max_too_long_share": 0.05, "tagged.too_long_share": 0.05,
                        "plain.too_long_share": 0.1}
    assert too_long_rule({"tagged": (20, 1)}, 0.05)[0]
    assert too_long_rule({"tagged": (0, 0)}, 0.0)[0]  # nothing annotated: nothing dropped


def test_an_answer_loss_that_does_not_fall_fails():
    rising = [(1, 2.0), (2, 2.5), (3, 2.0), (4, 2.5), (5, 2.0), (6, 2.5), (7, 3.0), (8, 3.5)]
    passed, metadata = loss_drop_rule(rising, 0.0)
    assert not passed
    assert (metadata["steps"], metadata["start"], metadata["end"]) == (8, 2.25, 3.25)  # first/last 2 of 8 steps
    flat = [(1, 1.0), (2, 1.0)]
    assert not loss_drop_rule(flat, 0.0)[0]  # ends at its start: not below it
    falling = [(1, 2.0), (2, 1.0)]
    assert loss_drop_rule(falling, 0.0) == (True, {"steps": 2, "start": 2.0, "end": 1.0, "drop": 0.5, "min_drop": 0.0})
    assert not loss_drop_rule(falling, 0.6)[0]  # fell by half, 60% asked
    assert loss_drop_rule([], 0.5) == (True, {"steps": 0})  # a one-stage arm has no stage 2


def test_minimum_and_maximum_rules():
    assert minimum_rule("format_accuracy", 0.5, 0.6) == (False, {"format_accuracy": 0.5, "min_format_accuracy": 0.6})
    assert minimum_rule("format_accuracy", 0.6, 0.6)[0]
    assert minimum_rule("format_accuracy", None, 0.6) == (True, {"format_accuracy": "n/a", "min_format_accuracy": 0.6})
    assert maximum_rule("length_cap_share", 0.4, 0.05) == (False, {"length_cap_share": 0.4, "max_length_cap_share": 0.05})
    assert maximum_rule("length_cap_share", 0.05, 0.05)[0]


def scores(length_cap_share: float, format_accuracy: float | None = 0.5) -> dict:
    return {"metrics": {"length_cap_share": length_cap_share, "format_accuracy": format_accuracy},
            "max_new_tokens": 128, "warnings": ["40% of the answers hit the cap of 128 new tokens"]}


def test_length_cap_check_warns_above_its_threshold(settings):
    at_limit = check_benchmark_scores_length_cap(settings, scores(0.05))
    assert at_limit.passed and at_limit.metadata["length_cap_share"].value == 0.05
    over = check_benchmark_scores_length_cap(settings, scores(0.4))
    assert not over.passed
    assert over.severity == dg.AssetCheckSeverity.WARN  # a floor on accuracy, not a broken run
    assert over.description == "40% of the answers hit the cap of 128 new tokens"
    assert over.metadata["max_new_tokens"].value == 128


def test_format_check_refuses_below_the_minimum_and_skips_the_plain_arm(settings):
    strict = PipelineSettings.of({**settings.raw, "checks": {"min_format_accuracy": 0.6}})
    assert not check_benchmark_scores_format_accuracy(strict, scores(0.0, 0.5)).passed
    assert check_benchmark_scores_format_accuracy(strict, scores(0.0, 0.6)).passed
    plain = check_benchmark_scores_format_accuracy(strict, scores(0.0, None))
    assert plain.passed and plain.description == "n/a: untagged (plain) arm"


def test_stage2_and_tokenized_checks_fail_on_their_assets_values(settings):
    rising = check_stage2_model_answer_loss(settings, {"answer_losses": [(1, 1.0), (2, 1.5)]})
    assert not rising.passed and rising.severity == dg.AssetCheckSeverity.ERROR
    one_stage = check_stage2_model_answer_loss(settings, {"answer_losses": []})
    assert one_stage.passed and one_stage.description == "n/a: no second stage"
    dropped = check_tokenized_dataset_too_long(settings, {"formats": {"tagged": {"annotated": 64, "too_long": 8}}})
    assert not dropped.passed and dropped.metadata["too_long_share"].value == 0.125


def test_the_gate_reads_the_data_checks_and_the_candidate_cells_checks():
    gated = [key.asset_key.to_user_string() + ":" + key.name for key in gated_check_keys("sftkey-tag.v2", 1)]
    assert gated == ["annotated_dataset:check_annotated_dataset_coverage",
                     "tokenized_dataset:check_tokenized_dataset_too_long",
                     "sftkey_tag_v2/seed1/stage2_model:check_stage2_model_answer_loss",
                     "sftkey_tag_v2/seed1/benchmark_scores:check_benchmark_scores_format_accuracy",
                     "sftkey_tag_v2/seed1/benchmark_scores:check_benchmark_scores_length_cap"]  # WARN never bars


def test_a_cells_check_is_named_with_its_cell():
    from orchestration.assets import cell_key
    from orchestration.checks import check_label

    assert check_label("check_benchmark_scores_format_accuracy", cell_key("sftkey_tag", 2, "benchmark_scores")) == (
        "check_benchmark_scores_format_accuracy [sftkey_tag|2]")
    assert check_label("check_annotated_dataset_coverage", dg.AssetKey("annotated_dataset")) == (
        "check_annotated_dataset_coverage")
