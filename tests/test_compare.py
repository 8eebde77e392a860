"""Arm comparison statistics on synthetic outcomes whose answers are known exactly."""

import json
import math

import numpy as np
import pytest

from sftkey.compare import (
    ArmSummary,
    Comparison,
    SeedTest,
    bootstrap_ci,
    bootstrap_means,
    compare_arms,
    from_json,
    mcnemar_exact_p,
    outcome_matrix,
    plot_accuracy,
    plot_loss_curves,
    question_sign_test_p,
    summarize_arms,
    to_json,
    to_markdown,
)

N_QUESTIONS = 300
SEEDS = (0, 1, 2)


def synthetic_arms() -> tuple[dict, dict]:
    """Arms A and B on 300 questions x 3 seeds; per seed B gains 20 questions and loses 5: net +15.

    Questions 0-59: A always wrong; under seed s, B gets questions 20s..20s+19 right.
    Questions 60-74: A always right; under seed s, B gets questions 60+5s..64+5s wrong.
    Questions 75+: both arms share a seed-dependent pattern.
    So per question over seeds: 60 questions favour B by one seed, 15 favour A by one seed.
    """
    a = np.zeros((len(SEEDS), N_QUESTIONS), dtype=bool)
    a[:, 60:75] = True
    for s in SEEDS:
        a[s, 75:] = (np.arange(75, N_QUESTIONS) + s) % 3 == 0
    b = a.copy()
    for s in SEEDS:
        b[s, 20 * s : 20 * s + 20] = True
        b[s, 60 + 5 * s : 65 + 5 * s] = False
    return _nested(a), _nested(b)


def _nested(matrix: np.ndarray) -> dict:
    return {seed: {f"q{q:03d}": bool(matrix[i, q]) for q in range(matrix.shape[1])} for i, seed in enumerate(SEEDS)}


@pytest.fixture(scope="module")
def arms():
    a, b = synthetic_arms()
    return {"A": a, "B": b}


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (1, 6, 0.125),  # n = 7: 2 * (1 + 7) / 128
        (6, 1, 0.125),
        (0, 5, 0.0625),  # 2 / 32
        (0, 10, 2 / 1024),
        (3, 3, 1.0),
        (0, 0, 1.0),
        (20, 5, 2 * sum(math.comb(25, k) for k in range(6)) / 2**25),
    ],
)
def test_mcnemar_exact_p(b, c, expected):
    assert mcnemar_exact_p(b, c) == expected


def test_mcnemar_equals_the_sum_of_outcomes_no_likelier_than_observed():
    # The other textbook definition of the two-sided exact p-value; for a fair coin it must agree.
    for b, c in [(1, 6), (12, 30), (200, 260), (7, 7)]:
        n = b + c
        observed = math.comb(n, b)
        total = sum(math.comb(n, k) for k in range(n + 1) if math.comb(n, k) <= observed)
        assert mcnemar_exact_p(b, c) == pytest.approx(min(1.0, total / 2**n), rel=1e-12)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="-1"):
        mcnemar_exact_p(-1, 3)


def test_known_difference_is_recovered(arms):
    result = compare_arms(arms, "B", "A", rng_seed=7)
    assert result.difference == 5.0  # 45 net questions out of 900 cells
    assert result.ci[0] > 0 and result.ci[1] > result.difference
    expected_seed_p = 2 * sum(math.comb(25, k) for k in range(6)) / 2**25
    assert result.seed_tests == tuple(SeedTest(s, 20, 5, expected_seed_p) for s in SEEDS)
    assert result.p_value == 2 * sum(math.comb(75, k) for k in range(16)) / 2**75  # 60 questions vs 15
    assert result.significant
    assert result.verdict().startswith("B vs A: +5.0 points [+")
    assert result.verdict().endswith(", p = 1.6e-07: significant")


def test_reversed_comparison_mirrors(arms):
    forward = compare_arms(arms, "B", "A", rng_seed=7)
    backward = compare_arms(arms, "A", "B", rng_seed=7)
    assert backward.difference == -5.0
    assert backward.ci == pytest.approx((-forward.ci[1], -forward.ci[0]), abs=1e-9)
    assert backward.p_value == forward.p_value


def test_identical_arms_are_not_different(arms):
    result = compare_arms({"A": arms["A"], "A copy": arms["A"]}, "A copy", "A")
    assert result.difference == 0.0
    assert result.ci == (0.0, 0.0)
    assert result.p_value == 1.0
    assert all(t == SeedTest(t.seed, 0, 0, 1.0) for t in result.seed_tests)
    assert not result.significant
    assert result.verdict() == "A copy vs A: +0.0 points [+0.0, +0.0], p = 1.0: not significant"


def test_verdict_format_and_rule():
    base = dict(arm="SFTKey-Tag", baseline="SFT-Tag", seed_tests=())
    line = Comparison(difference=1.8, ci=(-0.4, 4.0), p_value=0.11, **base).verdict()
    assert line == "SFTKey-Tag vs SFT-Tag: +1.8 points [-0.4, +4.0], p = 0.11: not significant"
    assert Comparison(difference=1.8, ci=(0.2, 3.4), p_value=0.049, **base).significant
    assert not Comparison(difference=1.8, ci=(0.2, 3.4), p_value=0.05, **base).significant  # p must be < alpha
    assert not Comparison(difference=1.8, ci=(-0.1, 3.4), p_value=0.01, **base).significant
    assert Comparison(difference=-2.0, ci=(-3.5, -0.5), p_value=0.01, **base).verdict() == (
        "SFTKey-Tag vs SFT-Tag: -2.0 points [-3.5, -0.5], p = 0.01: significant"
    )


def test_sign_test_with_one_seed_is_mcnemar():
    arm = np.array([[True, True, True, False, True, False, True, True]])
    base = np.array([[False, False, True, False, False, True, False, False]])
    assert question_sign_test_p(arm, base) == mcnemar_exact_p(5, 1)


def test_arm_summaries(arms):
    a, _ = synthetic_arms()
    matrix = np.array([[a[s][q] for q in sorted(a[s])] for s in SEEDS])
    summary = summarize_arms({"A": arms["A"]}, format_ok={"A": arms["A"]}, n_resamples=2000)[0]
    assert summary.arm == "A"
    assert summary.seeds == SEEDS
    assert summary.n_questions == N_QUESTIONS
    assert summary.accuracy == matrix.sum() / matrix.size
    assert summary.seed_accuracies == tuple(row.sum() / N_QUESTIONS for row in matrix)
    assert summary.ci[0] < summary.accuracy < summary.ci[1]
    assert summary.format_accuracy == summary.accuracy and summary.format_ci == summary.ci


def test_bootstrap_is_deterministic_and_exact_on_constants():
    rng = np.random.default_rng(0)
    values = rng.random((3, 50)) < 0.4
    assert bootstrap_ci(values, 1000, rng_seed=3) == bootstrap_ci(values, 1000, rng_seed=3)
    assert bootstrap_ci(values, 1000, rng_seed=3) != bootstrap_ci(values, 1000, rng_seed=4)
    assert bootstrap_ci(np.ones((3, 50), dtype=bool), 500) == (1.0, 1.0)


def test_bootstrap_spread_matches_the_binomial_standard_error():
    values = np.zeros((1, 400))
    values[0, :100] = 1.0  # one seed: only question sampling varies; sd = sqrt(0.25 * 0.75 / 400)
    means = bootstrap_means(values, n_resamples=4000, rng_seed=0)
    assert means.std() == pytest.approx(math.sqrt(0.25 * 0.75 / 400), rel=0.05)
    assert means.mean() == pytest.approx(0.25, abs=0.002)


def test_bootstrap_includes_seed_variance():
    # Seeds disagree completely (0% vs 100%), questions carry no variance: only seed resampling widens it.
    values = np.array([[0.0] * 100, [1.0] * 100])
    low, high = bootstrap_ci(values, 2000, rng_seed=0)
    assert (low, high) == (0.0, 1.0)


def test_inputs_are_validated(arms):
    broken = {0: {"q1": True, "q2": False}, 1: {"q1": True, "q3": False}}
    with pytest.raises(ValueError, match=r"arm 'X' seed 1: 2 question ids differ from seed 0"):
        outcome_matrix(broken, "X")
    with pytest.raises(ValueError, match="different seeds"):
        compare_arms({"A": arms["A"], "C": {0: arms["A"][0]}}, "C", "A")
    with pytest.raises(ValueError, match="unknown arm 'Z'"):
        compare_arms(arms, "Z", "A")
    with pytest.raises(ValueError, match="no seeds"):
        outcome_matrix({}, "empty")


def _fixed_summaries() -> list[ArmSummary]:
    return [
        ArmSummary("SFT-Tag", (0, 1), 1319, 0.029, (0.02, 0.038), (0.028, 0.03), 0.732, (0.71, 0.75)),
        ArmSummary("SFTKey-Tag", (0, 1), 1319, 0.024, (0.016, 0.032), (0.024, 0.024)),
    ]


def test_to_markdown_exact():
    comparison = Comparison("SFTKey-Tag", "SFT-Tag", -0.5, (-1.2, 0.3), 0.42, ())
    assert to_markdown(_fixed_summaries(), [comparison]) == (
        "| arm | accuracy | 95% CI | seed sd | format accuracy | format 95% CI | seeds | questions |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| SFT-Tag | 0.029 | [0.020, 0.038] | 0.001 | 0.732 | [0.710, 0.750] | 2 | 1319 |\n"
        "| SFTKey-Tag | 0.024 | [0.016, 0.032] | 0.000 | n/a | n/a | 2 | 1319 |\n"
        "\n"
        "- SFTKey-Tag vs SFT-Tag: -0.5 points [-1.2, +0.3], p = 0.42: not significant\n"
    )


def test_json_round_trip(arms, tmp_path):
    summaries = summarize_arms(arms, format_ok=arms, n_resamples=500)
    comparisons = [compare_arms(arms, "B", "A", n_resamples=500)]
    path = to_json(tmp_path / "report" / "comparison.json", summaries, comparisons)
    assert from_json(path) == (summaries, comparisons)
    payload = json.loads(path.read_text())
    assert payload["comparisons"][0]["verdict"] == comparisons[0].verdict()
    assert payload["comparisons"][0]["significant"] is True
    assert sorted(p.name for p in path.parent.iterdir()) == ["comparison.json"]  # no temp file left behind


def test_plots_write_png_files(tmp_path):
    accuracy = plot_accuracy(_fixed_summaries(), tmp_path / "accuracy.png")
    curves = plot_loss_curves({"SFTKey-Tag": [(0, 1.2), (10, 0.3), (20, 0.005)], "Key-Tag": [(0, 2.0), (20, 0.4)]},
                              tmp_path / "loss.png")
    for path in (accuracy, curves):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_loss_curves_rejects_an_empty_curve(tmp_path):
    with pytest.raises(ValueError, match="'SFT'"):
        plot_loss_curves({"SFT": []}, tmp_path / "loss.png")
