"""Comparing arms x seeds on the same questions: accuracy with bootstrap intervals, paired tests, reports.

Input is per-example booleans, `Outcomes`: arm -> seed -> question id -> correct (or format ok). Every seed of an
arm must cover the same questions, and two compared arms must share their seeds and questions, because both the
bootstrap and the tests pair runs by question and by seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sftkey.atomic import write_text

Outcomes = Mapping[str, Mapping[int, Mapping[str, bool]]]  # arm -> seed -> question id -> correct

ALPHA = 0.05  # significance level of the verdicts
LEVEL = 0.95  # coverage of the bootstrap intervals
N_RESAMPLES = 5000
_CHUNK = 256  # bootstrap replicates drawn at once: bounds memory at _CHUNK x seeds x questions cells


@dataclass(frozen=True)
class ArmSummary:
    """One arm's accuracy (fractions in [0, 1]) over seeds and questions, with percentile bootstrap intervals."""

    arm: str
    seeds: tuple[int, ...]
    n_questions: int
    accuracy: float
    ci: tuple[float, float]
    seed_accuracies: tuple[float, ...]
    format_accuracy: float | None = None
    format_ci: tuple[float, float] | None = None

    @property
    def seed_sd(self) -> float:
        """Standard deviation of the per-seed accuracies (n - 1 denominator; 0 with one seed)."""
        if len(self.seed_accuracies) < 2:
            return 0.0
        return float(np.std(self.seed_accuracies, ddof=1))


@dataclass(frozen=True)
class SeedTest:
    """Exact McNemar test of one seed: questions only the arm got right vs only the baseline got right."""

    seed: int
    arm_only: int
    baseline_only: int
    p_value: float


@dataclass(frozen=True)
class Comparison:
    """`arm` minus `baseline` in accuracy points (percentage points), paired by question and seed."""

    arm: str
    baseline: str
    difference: float
    ci: tuple[float, float]
    p_value: float
    seed_tests: tuple[SeedTest, ...]
    alpha: float = ALPHA

    @property
    def significant(self) -> bool:
        """The bootstrap interval excludes 0 and p < alpha.

        Both are required: the interval carries the seed-to-seed variance, the exact test gives a p-value that
        does not depend on resampling; a claim should survive either view.
        """
        return (self.ci[0] > 0 or self.ci[1] < 0) and self.p_value < self.alpha

    def verdict(self) -> str:
        """E.g. `SFTKey-Tag vs SFT-Tag: +1.8 points [-0.4, +4.0], p = 0.11: not significant`."""
        low, high = self.ci
        word = "significant" if self.significant else "not significant"
        return (
            f"{self.arm} vs {self.baseline}: {_signed(self.difference)} points "
            f"[{_signed(low)}, {_signed(high)}], p = {_format_p(self.p_value)}: {word}"
        )


# ---- inputs ----


def outcome_matrix(per_seed: Mapping[int, Mapping[str, bool]], arm: str = "arm") -> tuple[
    tuple[int, ...], tuple[str, ...], np.ndarray
]:
    """(seeds, question ids, matrix): the matrix is (n_seeds, n_questions) bool, both axes sorted."""
    if not per_seed:
        raise ValueError(f"arm {arm!r}: no seeds; give at least one seed's outcomes")
    seeds = tuple(sorted(per_seed))
    questions = tuple(sorted(per_seed[seeds[0]]))
    if not questions:
        raise ValueError(f"arm {arm!r} seed {seeds[0]}: no questions")
    for seed in seeds[1:]:
        if set(per_seed[seed]) != set(questions):
            odd = sorted(set(per_seed[seed]) ^ set(questions))
            raise ValueError(
                f"arm {arm!r} seed {seed}: {len(odd)} question ids differ from seed {seeds[0]} "
                f"(e.g. {odd[0]!r}); every seed must score the same questions"
            )
    matrix = np.array([[bool(per_seed[seed][q]) for q in questions] for seed in seeds], dtype=bool)
    return seeds, questions, matrix


# ---- statistics ----


def bootstrap_means(values: np.ndarray, n_resamples: int = N_RESAMPLES, rng_seed: int = 0) -> np.ndarray:
    """Means of `values` (n_seeds, n_questions) under a two-way bootstrap, one per replicate.

    Each replicate draws the seeds with replacement and, independently, the questions with replacement, and
    averages the selected cells: it carries both the run-to-run variance and the variance of the test sample.
    (This scheme slightly overstates the variance, a conservative error.) With one seed only the questions vary.
    Deterministic given `rng_seed`.
    """
    rng = np.random.default_rng(rng_seed)
    n_seeds, n_questions = values.shape
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        seeds = rng.integers(0, n_seeds, size=(size, n_seeds, 1))
        questions = rng.integers(0, n_questions, size=(size, 1, n_questions))
        means[start : start + size] = values[seeds, questions].mean(axis=(1, 2))  # (size, seeds, questions) -> (size,)
    return means


def bootstrap_ci(
    values: np.ndarray, n_resamples: int = N_RESAMPLES, rng_seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (n_seeds, n_questions) under `bootstrap_means`."""
    means = bootstrap_means(values.astype(float), n_resamples, rng_seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low) + 0.0, float(high) + 0.0  # + 0.0 turns -0.0 into 0.0


def mcnemar_exact_p(arm_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(n = discordant pairs, 1/2) test, computed exactly.

    p = min(1, 2 * P(X <= min(b, c))); for a fair coin doubling the smaller tail equals summing every outcome
    as unlikely as the observed one. No discordant pairs gives p = 1.
    """
    if arm_only < 0 or baseline_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {arm_only} and {baseline_only}")
    n = arm_only + baseline_only
    tail = sum(math.comb(n, k) for k in range(min(arm_only, baseline_only) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))  # exact until the final rounding


def discordant_counts(arm: np.ndarray, baseline: np.ndarray) -> tuple[int, int]:
    """(arm right and baseline wrong, arm wrong and baseline right) over paired boolean vectors."""
    return int(np.sum(arm & ~baseline)), int(np.sum(~arm & baseline))


def question_sign_test_p(arm: np.ndarray, baseline: np.ndarray) -> float:
    """Combined p-value over seeds: an exact sign test on questions, each question's outcome averaged over seeds.

    The question is the independent unit: the same questions appear under every seed, so per-seed tests are
    correlated, and pooling discordant pairs across seeds or combining per-seed p-values (Fisher, Stouffer) would
    treat them as independent and overstate the evidence. Averaging over seeds first and counting questions where
    the arm does better vs worse avoids that, stays exact, and with one seed is exactly McNemar's test.
    """
    per_question = arm.astype(int).sum(axis=0) - baseline.astype(int).sum(axis=0)  # (n_questions,)
    return mcnemar_exact_p(int(np.sum(per_question > 0)), int(np.sum(per_question < 0)))


def summarize_arm(
    arm: str,
    correct: Mapping[int, Mapping[str, bool]],
    format_ok: Mapping[int, Mapping[str, bool]] | None = None,
    n_resamples: int = N_RESAMPLES,
    rng_seed: int = 0,
) -> ArmSummary:
    """Accuracy of one arm (and its format accuracy when `format_ok` is given), with bootstrap intervals."""
    seeds, questions, matrix = outcome_matrix(correct, arm)
    format_accuracy = format_ci = None
    if format_ok is not None:
        _, _, formats = outcome_matrix(format_ok, arm)
        format_accuracy = float(formats.mean())
        format_ci = bootstrap_ci(formats, n_resamples, rng_seed)
    return ArmSummary(
        arm=arm,
        seeds=seeds,
        n_questions=len(questions),
        accuracy=float(matrix.mean()),
        ci=bootstrap_ci(matrix, n_resamples, rng_seed),
        seed_accuracies=tuple(float(row.mean()) for row in matrix),
        format_accuracy=format_accuracy,
        format_ci=format_ci,
    )


def summarize_arms(
    correct: Outcomes, format_ok: Outcomes | None = None, n_resamples: int = N_RESAMPLES, rng_seed: int = 0
) -> list[ArmSummary]:
    """`summarize_arm` for every arm of `correct`, in its order."""
    return [
        summarize_arm(arm, per_seed, None if format_ok is None else _arm(format_ok, arm), n_resamples, rng_seed)
        for arm, per_seed in correct.items()
    ]


def compare_arms(
    correct: Outcomes,
    arm: str,
    baseline: str,
    n_resamples: int = N_RESAMPLES,
    rng_seed: int = 0,
    alpha: float = ALPHA,
) -> Comparison:
    """`arm` minus `baseline`: mean paired difference in points, paired bootstrap interval, exact tests.

    The bootstrap resamples questions and seeds with the same draw for both arms (seed s of one arm is paired
    with seed s of the other, as in the per-seed McNemar tests), applied to the per-cell differences.
    """
    arm_seeds, arm_questions, arm_matrix = outcome_matrix(_arm(correct, arm), arm)
    base_seeds, base_questions, base_matrix = outcome_matrix(_arm(correct, baseline), baseline)
    if arm_seeds != base_seeds:
        raise ValueError(f"arms {arm!r} and {baseline!r} have different seeds {arm_seeds} and {base_seeds}")
    if arm_questions != base_questions:
        raise ValueError(f"arms {arm!r} and {baseline!r} score different questions; compare on the same questions")
    differences = arm_matrix.astype(int) - base_matrix.astype(int)  # (seeds, questions) in {-1, 0, 1}
    low, high = bootstrap_ci(differences, n_resamples, rng_seed)
    seed_tests = []
    for row, seed in enumerate(arm_seeds):
        arm_only, baseline_only = discordant_counts(arm_matrix[row], base_matrix[row])
        seed_tests.append(SeedTest(seed, arm_only, baseline_only, mcnemar_exact_p(arm_only, baseline_only)))
    return Comparison(
        arm=arm,
        baseline=baseline,
        difference=100.0 * int(differences.sum()) / differences.size + 0.0,  # integer sum: exact when it can be
        ci=(100.0 * low + 0.0, 100.0 * high + 0.0),
        p_value=question_sign_test_p(arm_matrix, base_matrix),
        seed_tests=tuple(seed_tests),
        alpha=alpha,
    )


def _arm(correct: Outcomes, arm: str) -> Mapping[int, Mapping[str, bool]]:
    if arm not in correct:
        raise ValueError(f"unknown arm {arm!r}; the outcomes hold {sorted(correct)}")
    return correct[arm]


# ---- reports ----


def to_markdown(summaries: Sequence[ArmSummary], comparisons: Sequence[Comparison] = ()) -> str:
    """A table of arms (accuracy as fractions, 95% intervals, seed sd) and one verdict line per comparison."""
    lines = [
        "| arm | accuracy | 95% CI | seed sd | format accuracy | format 95% CI | seeds | questions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        fmt = "n/a" if s.format_accuracy is None else f"{s.format_accuracy:.3f}"
        fmt_ci = "n/a" if s.format_ci is None else _interval(s.format_ci)
        lines.append(
            f"| {s.arm} | {s.accuracy:.3f} | {_interval(s.ci)} | {s.seed_sd:.3f} | {fmt} | {fmt_ci} "
            f"| {len(s.seeds)} | {s.n_questions} |"
        )
    if comparisons:
        lines.append("")
        lines.extend(f"- {c.verdict()}" for c in comparisons)
    return "\n".join(lines) + "\n"


def to_json(path: str | Path, summaries: Sequence[ArmSummary], comparisons: Sequence[Comparison] = ()) -> Path:
    """Write the summaries and comparisons (with their verdicts) as JSON; atomic: a temp file, then a rename."""
    path = Path(path)
    payload = {
        "arms": [asdict(s) for s in summaries],
        "comparisons": [dict(asdict(c), verdict=c.verdict(), significant=c.significant) for c in comparisons],
    }
    return write_text(path, json.dumps(payload, indent=2))


def from_json(path: str | Path) -> tuple[list[ArmSummary], list[Comparison]]:
    """Read what `to_json` wrote back into the dataclasses (the derived verdict fields are dropped)."""
    payload = json.loads(Path(path).read_text())
    summaries = [
        ArmSummary(
            **{
                **a,
                "seeds": tuple(a["seeds"]),
                "ci": tuple(a["ci"]),
                "seed_accuracies": tuple(a["seed_accuracies"]),
                "format_ci": None if a["format_ci"] is None else tuple(a["format_ci"]),
            }
        )
        for a in payload["arms"]
    ]
    comparisons = [
        Comparison(
            arm=c["arm"],
            baseline=c["baseline"],
            difference=c["difference"],
            ci=tuple(c["ci"]),
            p_value=c["p_value"],
            seed_tests=tuple(SeedTest(**t) for t in c["seed_tests"]),
            alpha=c["alpha"],
        )
        for c in payload["comparisons"]
    ]
    return summaries, comparisons


def plot_accuracy(summaries: Sequence[ArmSummary], path: str | Path) -> Path:
    """PNG bar chart: accuracy and format accuracy per arm, with their bootstrap intervals as error bars."""
    figure, axes = _figure()
    positions = np.arange(len(summaries))
    width = 0.38
    bars = [("accuracy", [(s.accuracy, s.ci) for s in summaries], -width / 2)]
    if any(s.format_accuracy is not None for s in summaries):
        formats = [(s.format_accuracy or 0.0, s.format_ci or (0.0, 0.0)) for s in summaries]
        bars.append(("format accuracy", formats, width / 2))
    for label, values, offset in bars:
        heights = np.array([v for v, _ in values])
        errors = np.array([[v - ci[0] for v, ci in values], [ci[1] - v for v, ci in values]]).clip(min=0)
        axes.bar(positions + offset, heights, width, yerr=errors, capsize=4, label=label)
    axes.set_xticks(positions, [s.arm for s in summaries], rotation=20, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel(f"fraction ({LEVEL:.0%} bootstrap interval)")
    axes.legend()
    return _save(figure, path)


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """PNG line chart of answer-span loss against training step, one line per arm (log scale when all > 0)."""
    figure, axes = _figure()
    for arm, points in curves.items():
        if not points:
            raise ValueError(f"loss curve of arm {arm!r} is empty")
        steps, losses = zip(*points)
        axes.plot(steps, losses, label=arm)
    if all(loss > 0 for points in curves.values() for _, loss in points):
        axes.set_yscale("log")  # the answer loss falls by orders of magnitude in stage 2
    axes.set_xlabel("step")
    axes.set_ylabel("answer loss")
    axes.legend()
    return _save(figure, path)


def _figure():
    """A figure on the Agg canvas, without pyplot: no global backend switch, no GUI, safe in workers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def _signed(value: float) -> str:
    return f"{value + 0.0:+.1f}"


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _format_p(p: float) -> str:
    """Two significant digits (`0.11`, `6.1e-05`); `1.0` rather than `1`."""
    text = f"{p:.2g}"
    return f"{text}.0" if text.isdigit() else text
