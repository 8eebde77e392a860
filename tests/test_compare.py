"""Arm comparison statistics on synthetic outcomes whose answers are known exactly, and their calibration by
simulation (false-positive rate and power, a small version of benchmarks/verdict_calibration.py)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sftkey.compare import (
    PAIRED,
    QUESTIONS_ONLY,
    UNPAIRED,
    ArmSummary,
    Comparison,
    Estimate,
    SeedTest,
    arms_sharing_a_stage,
    compare_arms,
    compare_with_baseline,
    crossed_estimate,
    curve_segments,
    draw_loss_curves,
    flat_metrics,
    from_json,
    holm_adjust,
    mcnemar_exact_p,
    outcome_matrix,
    plot_accuracy,
    plot_loss_curves,
    question_sign_test_p,
    summarize_arms,
    to_json,
    to_markdown,
    unpaired_difference,
    write_report,
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


# A 3-seed x 4-question table worked by hand: row means 1/2, 1/4, 3/4 (variance 1/16), column means 1, 2/3, 1/3, 0
# (variance 5/27), residual sum of squares 5/6 over (3-1)(4-1) = 6 cells (mean square 5/36).
HAND = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
HAND_SEED_PART = (1 / 16) / 3  # above the floor (5/36) / 4 = 5/144
HAND_QUESTION_PART = (5 / 27 - (5 / 36) / 3) / 4  # = 5/144
HAND_ESTIMATE = Estimate(0.5, math.sqrt(HAND_SEED_PART + HAND_QUESTION_PART),
                         (HAND_SEED_PART + HAND_QUESTION_PART) ** 2 / (HAND_SEED_PART**2 / 2 + HAND_QUESTION_PART**2 / 3))


def test_crossed_estimate_worked_by_hand():
    estimate = crossed_estimate(HAND)
    assert estimate.mean == 0.5
    assert estimate.se == pytest.approx(HAND_ESTIMATE.se, rel=1e-12)  # sqrt(1/18)
    assert estimate.df == pytest.approx(HAND_ESTIMATE.df, rel=1e-12)  # 64 / (9/2 + 25/3)
    assert estimate.se == pytest.approx(math.sqrt(1 / 18), rel=1e-12)


def test_seed_spread_is_floored_at_the_per_model_noise():
    # Three seeds that agree exactly on their mean (1/3): the spread over seeds is 0, but each model's per-question
    # noise says such models would differ by chance. Residuals are x - 1/3: three of 2/3 and six of -1/3, sum of
    # squares 2, mean square 2 / ((3-1)(3-1)) = 1/2; floor 1/2 / 3 questions; question part 0 (equal columns).
    cells = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    estimate = crossed_estimate(cells)
    assert estimate.se == pytest.approx(math.sqrt((1 / 2) / 3 / 3), rel=1e-12)  # floor / seeds
    assert estimate.df == 2
    assert estimate.se > 0


def test_below_three_seeds_only_questions_vary():
    one_seed = np.array([[1, 1, 0, 0, 1]])
    estimate = crossed_estimate(one_seed)
    assert (estimate.mean, estimate.df) == (0.6, 4)
    assert estimate.se == pytest.approx(math.sqrt(0.3 / 5), rel=1e-12)  # sample variance 0.3 over 5 questions
    two_seeds = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert crossed_estimate(two_seeds).se == pytest.approx(math.sqrt(np.var([1, 0.5, 0, 0], ddof=1) / 4), rel=1e-12)


def test_unpaired_difference_against_an_all_wrong_baseline_is_the_arm_itself():
    estimate = unpaired_difference(HAND, np.zeros((3, 4)))
    assert (estimate.mean, estimate.se, estimate.df) == pytest.approx((0.5, HAND_ESTIMATE.se, HAND_ESTIMATE.df), rel=1e-12)


def test_estimate_interval_and_p_value():
    estimate = Estimate(2.0, 1.0, 10.0)
    low, high = estimate.interval()
    assert (low, high) == pytest.approx((2.0 - 2.228138851986274, 2.0 + 2.228138851986274), rel=1e-9)  # t(10)
    assert estimate.p_value() == pytest.approx(0.0733880347707, rel=1e-9)  # two-sided, t = 2 with 10 df
    assert Estimate(0.0, 0.0, math.inf).p_value() == 1.0 and Estimate(0.0, 0.0, math.inf).interval() == (0.0, 0.0)


def test_holm_adjustment():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm_adjust([0.04, 0.03]) == pytest.approx([0.06, 0.06])  # monotone: never below a smaller p's
    assert holm_adjust([]) == []


def test_known_difference_is_recovered(arms):
    # Unpaired, 5 points on 300 questions with 3 seeds per arm is within what 6 independently trained models can
    # differ by: every seed of each arm has the same accuracy, but each model's per-question noise says they need not.
    result = compare_arms(arms, "B", "A")
    assert result.difference == 5.0  # 45 net questions out of 900 cells
    assert (result.design, result.n_seeds, result.p_adjusted) == (UNPAIRED, 3, None)
    assert result.ci[0] < 0 < result.difference < result.ci[1]
    expected_seed_p = 2 * sum(math.comb(25, k) for k in range(6)) / 2**25
    assert result.seed_tests == tuple(SeedTest(s, 20, 5, expected_seed_p) for s in SEEDS)
    a, b = (np.array([[arms[x][s][q] for q in sorted(arms[x][s])] for s in SEEDS]) for x in ("A", "B"))
    estimate = unpaired_difference(b, a)
    assert result.p_value == estimate.p_value() and result.ci == pytest.approx(
        tuple(100 * x for x in estimate.interval()), rel=1e-12)
    assert not result.significant
    assert result.verdict().startswith("B vs A: +5.0 points [-")
    assert result.verdict().endswith(": not significant; 3 seeds, unpaired (Welch); seeds and questions as random "
                                     "effects")


def test_paired_design_runs_on_per_cell_differences(arms):
    result = compare_arms(arms, "B", "A", paired=True)
    a, b = (np.array([[arms[x][s][q] for q in sorted(arms[x][s])] for s in SEEDS]) for x in ("A", "B"))
    estimate = crossed_estimate(b.astype(int) - a.astype(int))
    assert (result.design, result.difference, result.p_value) == (PAIRED, 5.0, estimate.p_value())
    # Every seed gains exactly 15 questions: the seed spread is 0, so the floor (per-model noise) carries it; the
    # shared stage's noise cancels in the per-cell differences, and the gain is significant even with 2 df.
    assert estimate.df == 2 and estimate.se > 0
    assert result.significant and result.ci[0] > 0
    with pytest.raises(ValueError, match="paired by seed but have different seeds"):
        compare_arms({"A": arms["A"], "C": {0: arms["A"][0]}}, "C", "A", paired=True)


def test_reversed_comparison_mirrors(arms):
    forward = compare_arms(arms, "B", "A")
    backward = compare_arms(arms, "A", "B")
    assert backward.difference == -5.0
    assert backward.ci == pytest.approx((-forward.ci[1], -forward.ci[0]), abs=1e-9)
    assert backward.p_value == pytest.approx(forward.p_value, rel=1e-12)


def test_identical_arms_are_not_different(arms):
    result = compare_arms({"A": arms["A"], "A copy": arms["A"]}, "A copy", "A", paired=True)
    assert result.difference == 0.0
    assert result.ci == (0.0, 0.0)
    assert result.p_value == 1.0
    assert all(t == SeedTest(t.seed, 0, 0, 1.0) for t in result.seed_tests)
    assert not result.significant
    assert result.verdict() == ("A copy vs A: +0.0 points [+0.0, +0.0], p = 1.0: not significant; 3 seeds, "
                                "paired by seed (shared stage); seeds and questions as random effects")


def test_one_seed_is_about_these_models_only(arms):
    one = {arm: {0: per_seed[0]} for arm, per_seed in arms.items()}
    result = compare_arms(one, "B", "A")
    assert (result.design, result.n_seeds) == (QUESTIONS_ONLY, 1)
    assert result.p_value == mcnemar_exact_p(20, 5)  # the sign test over questions is McNemar's with one seed
    assert result.verdict().endswith("; 1 seed: seed variance cannot be estimated (fewer than 3), so this verdict "
                                     "is about these trained models only")


def test_verdict_format_and_rule():
    base = dict(arm="SFTKey-Tag", baseline="SFT-Tag", seed_tests=())
    line = Comparison(difference=1.8, ci=(-0.4, 4.0), p_value=0.11, **base).verdict()
    assert line == ("SFTKey-Tag vs SFT-Tag: +1.8 points [-0.4, +4.0], p = 0.11: not significant; 1 seed: seed "
                    "variance cannot be estimated (fewer than 3), so this verdict is about these trained models only")
    assert Comparison(difference=1.8, ci=(0.2, 3.4), p_value=0.049, **base).significant
    assert not Comparison(difference=1.8, ci=(0.2, 3.4), p_value=0.05, **base).significant  # p must be < alpha
    holm = Comparison(difference=1.8, ci=(0.2, 3.4), p_value=0.02, p_adjusted=0.06, n_compared=3, n_seeds=3,
                      design=UNPAIRED, **base)
    assert not holm.significant  # the adjusted p decides
    assert holm.verdict() == ("SFTKey-Tag vs SFT-Tag: +1.8 points [+0.2, +3.4], p = 0.02 (Holm over 3: 0.06): "
                              "not significant; 3 seeds, unpaired (Welch); seeds and questions as random effects")


def test_holm_over_the_arms_compared_with_one_baseline(arms):
    outcomes = {"A": arms["A"], "B": arms["B"], "A copy": arms["A"]}
    comparisons = compare_with_baseline(outcomes, "A", paired_arms=["A copy"])
    assert [(c.arm, c.design, c.n_compared) for c in comparisons] == [("B", UNPAIRED, 2), ("A copy", PAIRED, 2)]
    assert [c.p_adjusted for c in comparisons] == holm_adjust([c.p_value for c in comparisons])
    single = compare_with_baseline({"A": arms["A"], "B": arms["B"]}, "A")
    assert single[0].p_adjusted is None and single[0].n_compared == 1


def test_arms_pair_when_every_seed_shares_a_stage(arms):
    outcomes = {"sft_tag": arms["A"], "sftkey_tag": arms["B"], "key_tag": arms["B"]}
    keys = {("sft_tag", s): {f"stage1-{s}"} for s in SEEDS}
    keys |= {("sftkey_tag", s): {f"stage1-{s}", f"stage2-{s}"} for s in SEEDS}
    keys |= {("key_tag", s): {f"key-{s}"} for s in SEEDS}
    assert arms_sharing_a_stage(outcomes, keys, "sft_tag") == ["sftkey_tag"]
    keys["sftkey_tag", 2] = {"elsewhere"}  # one seed without the shared stage: no pairing at all
    assert arms_sharing_a_stage(outcomes, keys, "sft_tag") == []
    assert arms_sharing_a_stage(outcomes, {}, "sft_tag") == []  # unknown lineages never pair


def test_sign_test_with_one_seed_is_mcnemar():
    arm = np.array([[True, True, True, False, True, False, True, True]])
    base = np.array([[False, False, True, False, False, True, False, False]])
    assert question_sign_test_p(arm, base) == mcnemar_exact_p(5, 1)


def test_arm_summaries(arms):
    a, _ = synthetic_arms()
    matrix = np.array([[a[s][q] for q in sorted(a[s])] for s in SEEDS])
    summary = summarize_arms({"A": arms["A"]}, format_ok={"A": arms["A"]})[0]
    assert summary.arm == "A"
    assert summary.seeds == SEEDS
    assert summary.n_questions == N_QUESTIONS
    assert summary.accuracy == matrix.sum() / matrix.size
    assert summary.seed_accuracies == tuple(row.sum() / N_QUESTIONS for row in matrix)
    assert summary.ci == pytest.approx(crossed_estimate(matrix).interval(), rel=1e-12)
    assert summary.ci[0] < summary.accuracy < summary.ci[1]
    assert summary.format_accuracy == summary.accuracy and summary.format_ci == summary.ci
    plain = summarize_arms({"A": arms["A"]}, format_ok={})[0]
    assert (plain.format_accuracy, plain.format_ci) == (None, None)


def test_accuracy_intervals_stay_inside_0_and_1():
    all_wrong = {0: {f"q{i}": False for i in range(10)}}
    # One seed: Wilson's score interval over the questions, which does not collapse at 0 right: [0, z^2 / (n + z^2)]
    z = 1.959963984540054
    assert summarize_arms({"A": all_wrong})[0].ci == pytest.approx((0.0, z * z / (10 + z * z)), rel=1e-12)
    assert summarize_arms({"A": all_wrong})[0].ci[1] == pytest.approx(0.2775, abs=1e-4)
    mostly_wrong = {s: {f"q{i}": i == 0 for i in range(10)} for s in SEEDS}
    assert summarize_arms({"A": mostly_wrong})[0].ci[0] == 0.0


def test_inputs_are_validated(arms):
    broken = {0: {"q1": True, "q2": False}, 1: {"q1": True, "q3": False}}
    with pytest.raises(ValueError, match=r"arm 'X' seed 1: 2 question ids differ from seed 0"):
        outcome_matrix(broken, "X")
    with pytest.raises(ValueError, match=r"score different questions \(301 differ, e.g. 'other'\)"):
        compare_arms({"A": arms["A"], "C": {0: {"other": True}}}, "C", "A")
    with pytest.raises(ValueError, match="unknown arm 'Z'"):
        compare_arms(arms, "Z", "A")
    with pytest.raises(ValueError, match="no seeds"):
        outcome_matrix({}, "empty")
    with pytest.raises(ValueError, match="at least 2"):
        crossed_estimate(np.ones((3, 1)))


# ---- calibration: the false-positive rate stays at alpha whatever the seed variance; power where it can be ----


@pytest.fixture(scope="module")
def calibration():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verdict_calibration.py"
    spec = importlib.util.spec_from_file_location("verdict_calibration", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_false_positives_stay_at_alpha_when_seeds_vary(calibration):
    world = calibration.World(seed_sd=0.8, questions=200)
    hits, n = calibration.significant_share(world, 150, seed=11)
    assert hits / n <= 0.09  # 0.05 expected; 0.09 is 2 binomial standard errors above it
    # The old verdict (a sign test over questions, seeds averaged) is fooled by the seed effects most of the time.
    old_hits, _ = calibration.significant_share(world, 150, seed=11, sign_test=True)
    assert old_hits / n >= 0.5


def test_power_with_little_seed_variance(calibration):
    hits, n = calibration.significant_share(calibration.World(effect=0.45), 120, seed=12)
    assert hits / n >= 0.65  # about 0.82 over 1,000 experiments (benchmarks/RESULTS.md)


def test_family_wise_error_over_six_arms(calibration):
    hits, n = calibration.significant_share(calibration.World(seed_sd=0.5, arms=6, questions=150), 80, seed=13)
    assert hits / n <= 0.1


def _fixed_summaries() -> list[ArmSummary]:
    return [
        ArmSummary("SFT-Tag", (0, 1), 1319, 0.029, (0.02, 0.038), (0.028, 0.03), 0.732, (0.71, 0.75)),
        ArmSummary("SFTKey-Tag", (0, 1), 1319, 0.024, (0.016, 0.032), (0.024, 0.024)),
    ]


def test_to_markdown_exact():
    comparison = Comparison("SFTKey-Tag", "SFT-Tag", -0.5, (-1.2, 0.3), 0.42, (), n_seeds=2)
    assert to_markdown(_fixed_summaries(), [comparison]) == (
        "| arm | accuracy | 95% CI | seed sd | format accuracy | format 95% CI | seeds | questions |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| SFT-Tag | 0.029 | [0.020, 0.038] | 0.001 | 0.732 | [0.710, 0.750] | 2 | 1319 |\n"
        "| SFTKey-Tag | 0.024 | [0.016, 0.032] | 0.000 | n/a | n/a | 2 | 1319 |\n"
        "\n"
        "- SFTKey-Tag vs SFT-Tag: -0.5 points [-1.2, +0.3], p = 0.42: not significant; 2 seeds: seed variance "
        "cannot be estimated (fewer than 3), so this verdict is about these trained models only\n"
    )


def test_json_round_trip(arms, tmp_path):
    summaries = summarize_arms(arms, format_ok=arms)
    comparisons = compare_with_baseline({**arms, "A copy": arms["A"]}, "A", paired_arms=["A copy"])
    path = to_json(tmp_path / "report" / "comparison.json", summaries, comparisons)
    assert from_json(path) == (summaries, comparisons)
    payload = json.loads(path.read_text())
    assert payload["comparisons"][0]["verdict"] == comparisons[0].verdict()
    assert [c["significant"] for c in payload["comparisons"]] == [c.significant for c in comparisons]
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


SHARED_STAGE_CURVES = {  # SFTKey-Tag continues SFT-Tag's stage 1 (the same points); Plain trained alone
    "SFT-Tag": [(1, 3.0), (2, 2.0), (3, 1.5)],
    "SFTKey-Tag": [(1, 3.0), (2, 2.0), (3, 1.5), (4, 0.5), (5, 0.1)],
    "Plain": [(1, 4.0), (2, 3.0)],
}


def test_a_shared_stage_is_drawn_once_on_top_so_the_baseline_stays_visible():
    from matplotlib.figure import Figure

    axes = Figure().add_subplot()
    lines = draw_loss_curves(axes, SHARED_STAGE_CURVES)
    assert [line.get_label() for line in lines] == ["SFT-Tag, SFTKey-Tag (shared)", "SFTKey-Tag", "Plain"]
    assert [line.get_xydata().tolist() for line in lines] == [
        [[1, 3.0], [2, 2.0], [3, 1.5]],
        [[3, 1.5], [4, 0.5], [5, 0.1]],  # from the last shared point: the lines join
        [[1, 4.0], [2, 3.0]],
    ]
    shared, own, plain = lines
    assert shared.get_zorder() > max(own.get_zorder(), plain.get_zorder())
    assert (own.get_marker(), own.get_markevery()) == ("o", [0])  # the dot where SFTKey-Tag leaves stage 1
    assert (plain.get_marker(), own.get_color(), plain.get_color()) == ("None", "C1", "C2")


def test_curve_segments_split_wherever_arms_part():
    a, b, c = [(1, 3.0), (2, 2.0), (3, 1.0)], [(1, 3.0), (2, 2.0), (3, 1.2)], [(1, 3.0), (2, 2.5)]
    assert [(s.arms, s.points, s.joins) for s in curve_segments({"A": a, "B": b, "C": c})] == [
        (("A", "B", "C"), ((1, 3.0),), False),
        (("A", "B"), ((1, 3.0), (2, 2.0)), True),
        (("A",), ((2, 2.0), (3, 1.0)), True),
        (("B",), ((2, 2.0), (3, 1.2)), True),
        (("C",), ((1, 3.0), (2, 2.5)), True),
    ]
    assert [s.label for s in curve_segments({"A": a, "C": [(0, 9.0)]})] == ["A", "C"]  # nothing shared


def test_write_report_writes_every_file_from_one_computation(arms, tmp_path):
    correct = {**arms, "A copy": arms["A"]}
    stage_keys = {(arm, s): ["k-shared"] if arm != "B" else [f"k-b{s}"] for arm in correct for s in SEEDS}
    out = tmp_path / "report"
    (out / "answer_loss").mkdir(parents=True)
    (out / "answer_loss" / "gone.csv").write_text("step,answer_loss\n")  # an arm of an earlier report
    report = write_report(out, correct, {"A": arms["A"]}, stage_keys, "A", curves=SHARED_STAGE_CURVES,
                          warnings=["B seed 0: 12% of answers hit the cap"], alpha=0.01)

    assert [c.arm for c in report.comparisons] == ["B", "A copy"]
    assert [(c.design, c.alpha, c.n_compared) for c in report.comparisons] == [(UNPAIRED, 0.01, 2), (PAIRED, 0.01, 2)]
    assert report.comparisons == compare_with_baseline(correct, "A", ["A copy"], alpha=0.01)
    assert report.table == to_markdown(report.summaries, report.comparisons) + (
        "\nwarning: B seed 0: 12% of answers hit the cap\n")
    assert (out / "comparison.md").read_text() == report.table
    assert from_json(out / "comparison.json") == (report.summaries, report.comparisons)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == flat_metrics(report.summaries, report.comparisons)
    a, b = report.summaries[0], report.summaries[1]
    assert metrics["A"] == {"accuracy": a.accuracy, "ci_low": a.ci[0], "ci_high": a.ci[1],
                            "format_accuracy": a.format_accuracy}
    assert metrics["B"] == {"accuracy": b.accuracy, "ci_low": b.ci[0], "ci_high": b.ci[1], "difference_points": 5.0,
                            "p_value": report.comparisons[0].p_adjusted}
    assert (out / "accuracy.csv").read_text().splitlines()[:2] == [
        "arm,accuracy,ci_low,ci_high", f"A,{a.accuracy!r},{a.ci[0]!r},{a.ci[1]!r}"]
    assert (out / "answer_loss" / "Plain.csv").read_text() == "step,answer_loss\n1,4.0\n2,3.0\n"
    assert sorted(p.name for p in (out / "answer_loss").iterdir()) == ["Plain.csv", "SFT-Tag.csv", "SFTKey-Tag.csv"]
    assert [p.name for p in report.plots] == ["accuracy.png", "answer_loss.png"]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(report.files + report.plots)  # no temp file
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in report.plots)


def test_write_report_without_curves_has_no_loss_files(arms, tmp_path):
    write_report(tmp_path, arms, None, {}, "A", curves={"A": [(1, 2.0)]})  # an earlier report with curves
    report = write_report(tmp_path, arms, None, {}, "A")
    assert report.files[-1] == tmp_path / "accuracy.csv" and not list((tmp_path / "answer_loss").iterdir())
    (tmp_path / "answer_loss").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy.csv", "accuracy.png", "comparison.json", "comparison.md", "metrics.json"]
    assert [c.design for c in report.comparisons] == [UNPAIRED]  # unknown lineages never pair
    with pytest.raises(ValueError, match="unknown arm 'C'"):
        write_report(tmp_path / "other", arms, None, {}, "C")
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_cli_loss_curve_reads_a_reused_stage_from_the_run_that_trained_it(tmp_path):
    from sftkey.commands.compare import answer_loss_curve

    def run(arm, stages, rows):
        root = tmp_path / arm / "seed0"
        for stage in stages:
            Path(stage["checkpoint"]).mkdir(parents=True)
            (Path(stage["checkpoint"]) / "sftkey.json").write_text(json.dumps({"stage": stage["name"]}))
        (root / "run.json").write_text(json.dumps({"stages": stages}))
        (root / "metrics.jsonl").write_text("".join(json.dumps({"type": "metrics", **r}) + "\n" for r in rows))
        return [stage["checkpoint"] for stage in stages]

    (base,) = run("sft_tag", [{"name": "stage1", "checkpoint": str(tmp_path / "sft_tag/seed0/checkpoints/stage1-final")}],
                  [{"step": 1, "stage": "stage1", "loss_answer": 3.0}, {"step": 2, "stage": "stage1", "loss_answer": 2.0}])
    own1, own2 = run("sftkey_tag", [
        {"name": "stage1", "checkpoint": str(tmp_path / "sftkey_tag/seed0/checkpoints/stage1-final"), "reused_from": base},
        {"name": "stage2", "checkpoint": str(tmp_path / "sftkey_tag/seed0/checkpoints/stage2-final")}],
        [{"step": 3, "stage": "stage2", "loss_answer": 0.5}, {"step": 4, "stage": "stage2", "loss": 1.0}])
    assert answer_loss_curve(own2) == [(1, 3.0), (2, 2.0), (3, 0.5)]  # step 4 logged no answer loss
    assert answer_loss_curve(own1) == answer_loss_curve(base) == [(1, 3.0), (2, 2.0)]  # up to the checkpoint's stage
    assert answer_loss_curve(str(tmp_path / "elsewhere" / "model")) == answer_loss_curve(None) == []
