"""Comparing arms x seeds on the same questions: accuracy with intervals, seed-aware tests, reports.

Input is per-example booleans, `Outcomes`: arm -> seed -> question id -> correct (or format ok). Every seed of an
arm must cover the same questions, and compared arms must share their questions.

What a verdict rests on (the README's "What a verdict means" says it for users):
- The unit of replication is a trained model, one per (arm, seed); the test questions are a sample too. With at
  least `MIN_SEEDS` seeds per arm, a mean (an arm's accuracy, or a difference between arms) is analysed with
  seeds and questions as crossed random effects: its variance is the seed part (variance of the per-model means,
  over seeds, at least what each model's per-question noise implies) plus the question part (variance of the
  per-question means beyond what the per-model noise already explains, over questions). A t test and interval use Satterthwaite's degrees of freedom, which fall towards
  seeds - 1 when seeds dominate. That keeps false positives at alpha whatever the seed-to-seed variance.
- Arms that share a trained stage (SFTKey-Tag continues SFT-Tag's stage 1) are paired by seed: the analysis runs
  on the per-cell differences, where the shared stage's seed effect cancels. Other arms are compared unpaired:
  each arm's seed part has its own variance (Welch).
- Below `MIN_SEEDS` seeds the seed variance cannot be estimated: the test is the exact sign test over questions
  (McNemar's test with one seed), the interval is over questions (Wilson's for an accuracy), and the verdict is
  about these trained models only, not the training recipe.
- Comparing several arms with one baseline: Holm's step-down correction of the p-values, so the chance of any
  false "significant" in the family stays at alpha. Exact McNemar tests per seed are kept as details.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sftkey.atomic import fsync_dir, write_text
from sftkey.errors import UserError


class CompareError(UserError, ValueError):
    """Outcomes that cannot be compared (no seeds, questions or seeds that differ); the message says which."""


Outcomes = Mapping[str, Mapping[int, Mapping[str, bool]]]  # arm -> seed -> question id -> correct

ALPHA = 0.05  # significance level of the verdicts (family-wise, after Holm's correction)
LEVEL = 0.95  # coverage of the intervals
MIN_SEEDS = 3  # fewer seeds per arm: no estimate of the seed variance, verdicts about these models only

PAIRED = "paired by seed (shared stage)"
UNPAIRED = "unpaired (Welch)"
QUESTIONS_ONLY = "questions only"


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and degrees of freedom (t distribution; inf: normal)."""

    mean: float
    se: float
    df: float

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        if self.se == 0:
            return self.mean + 0.0, self.mean + 0.0
        half = _t_quantile(1 - (1 - level) / 2, self.df) * self.se
        return self.mean - half + 0.0, self.mean + half + 0.0

    def p_value(self) -> float:
        """Two-sided t test of mean = 0; a nonzero mean with no variance at all is certain (p = 0)."""
        if self.se == 0:
            return 1.0 if self.mean == 0 else 0.0
        from scipy.stats import t

        return float(min(1.0, 2 * t.sf(abs(self.mean) / self.se, self.df)))


def _t_quantile(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def _combine(mean: float, parts: Sequence[tuple[float, float]]) -> Estimate:
    """Sum of independent variance parts [(variance, df)] with Satterthwaite's degrees of freedom."""
    variance = sum(v for v, _ in parts)
    if variance <= 0:
        return Estimate(mean, 0.0, math.inf)
    denominator = sum(v * v / df for v, df in parts if v > 0)
    return Estimate(mean, math.sqrt(variance), variance * variance / denominator)


def _residual_mean_square(cells: np.ndarray) -> float:
    """Two-way (seeds x questions) interaction mean square: per-model noise around row + column effects."""
    n_seeds, n_questions = cells.shape
    residual = cells - cells.mean(axis=1, keepdims=True) - cells.mean(axis=0, keepdims=True) + cells.mean()
    return float((residual**2).sum() / ((n_seeds - 1) * (n_questions - 1)))


def _seed_part(cells: np.ndarray) -> tuple[float, float]:
    """(variance of the mean due to models, its df): the spread of per-model means over seeds.

    Never below the spread that each model's per-question noise alone implies (residual mean square / questions):
    seeds that agree more closely than that do so by chance, and a spread of exactly 0 would read as certainty.
    """
    n_seeds, n_questions = cells.shape
    spread = max(float(cells.mean(axis=1).var(ddof=1)), _residual_mean_square(cells) / n_questions)
    return spread / n_seeds, n_seeds - 1


def crossed_estimate(cells: np.ndarray) -> Estimate:
    """Mean of a (seeds, questions) table with seeds and questions as crossed random effects.

    Below MIN_SEEDS seeds only the questions vary (the models are taken as given).
    """
    cells = np.asarray(cells, dtype=float)
    n_seeds, n_questions = _check_shape(cells)
    columns = cells.mean(axis=0)
    if n_seeds < MIN_SEEDS:
        return _combine(float(cells.mean()), [(float(columns.var(ddof=1)) / n_questions, n_questions - 1)])
    question_variance = max(0.0, float(columns.var(ddof=1)) - _residual_mean_square(cells) / n_seeds)
    return _combine(float(cells.mean()), [_seed_part(cells), (question_variance / n_questions, n_questions - 1)])


def unpaired_difference(arm: np.ndarray, baseline: np.ndarray) -> Estimate:
    """Mean of `arm` minus mean of `baseline` (each (seeds, questions), the same questions), seeds unpaired.

    Each arm's seed part keeps its own variance (Welch); the question part is the spread of the per-question
    differences beyond both arms' per-model noise. Below MIN_SEEDS seeds in either arm: questions only.
    """
    arm, baseline = np.asarray(arm, dtype=float), np.asarray(baseline, dtype=float)
    _check_shape(arm)
    _check_shape(baseline)
    n_questions = arm.shape[1]
    differences = arm.mean(axis=0) - baseline.mean(axis=0)  # (questions,)
    mean = float(arm.mean() - baseline.mean())
    if min(arm.shape[0], baseline.shape[0]) < MIN_SEEDS:
        return _combine(mean, [(float(differences.var(ddof=1)) / n_questions, n_questions - 1)])
    noise = _residual_mean_square(arm) / arm.shape[0] + _residual_mean_square(baseline) / baseline.shape[0]
    question_variance = max(0.0, float(differences.var(ddof=1)) - noise)
    return _combine(mean, [_seed_part(arm), _seed_part(baseline), (question_variance / n_questions, n_questions - 1)])


def _check_shape(cells: np.ndarray) -> tuple[int, int]:
    n_seeds, n_questions = cells.shape
    if n_questions < 2:
        raise CompareError(f"{n_questions} question(s): an interval over questions needs at least 2")
    return n_seeds, n_questions


def accuracy_interval(cells: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Interval of an accuracy, a (seeds, questions) table of 0/1: crossed random effects from MIN_SEEDS seeds on,
    else Wilson's score interval over the questions (which, unlike a t interval, does not shrink to a point at an
    accuracy of 0 or 1: 0 of 10 right is [0, 0.28], not [0, 0])."""
    cells = np.asarray(cells, dtype=float)
    n_seeds, n_questions = _check_shape(cells)
    if n_seeds >= MIN_SEEDS:
        return _clipped(crossed_estimate(cells).interval(level))
    return wilson_interval(float(cells.mean()) * n_questions, n_questions, level)


def wilson_interval(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a proportion `successes / n`."""
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half) + 0.0, min(1.0, centre + half) + 0.0


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: reject those below alpha and the family-wise error stays at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class ArmSummary:
    """One arm's accuracy (fractions in [0, 1]) over seeds and questions, with intervals (see the module doc).

    format_accuracy is None for an arm whose format is not judged (the plain arm: it has no tags to check).
    """

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
    """`arm` minus `baseline` in accuracy points (percentage points) on the same questions.

    p_value is the comparison's own test; p_adjusted is Holm's adjustment over the `n_compared` arms compared with
    the same baseline (None: a single comparison). design says how seeds entered (PAIRED, UNPAIRED or
    QUESTIONS_ONLY when an arm has fewer than MIN_SEEDS seeds); n_seeds is the smaller seed count of the two.
    """

    arm: str
    baseline: str
    difference: float
    ci: tuple[float, float]
    p_value: float
    seed_tests: tuple[SeedTest, ...]
    alpha: float = ALPHA
    p_adjusted: float | None = None
    n_compared: int = 1
    n_seeds: int = 1
    design: str = QUESTIONS_ONLY

    @property
    def significant(self) -> bool:
        """The (Holm-adjusted) p-value is below alpha."""
        return (self.p_value if self.p_adjusted is None else self.p_adjusted) < self.alpha

    def verdict(self) -> str:
        """E.g. `SFTKey-Tag vs SFT-Tag: +1.8 points [-0.4, +4.0], p = 0.11: not significant; 3 seeds, ...`."""
        low, high = self.ci
        p = f"p = {_format_p(self.p_value)}"
        if self.p_adjusted is not None:
            p += f" (Holm over {self.n_compared}: {_format_p(self.p_adjusted)})"
        word = "significant" if self.significant else "not significant"
        return (
            f"{self.arm} vs {self.baseline}: {_signed(self.difference)} points "
            f"[{_signed(low)}, {_signed(high)}], {p}: {word}; {self.scope()}"
        )

    def scope(self) -> str:
        """What the verdict is about: the training recipe (seeds estimated) or these trained models only."""
        seeds = f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        if self.design == QUESTIONS_ONLY:
            return (f"{seeds}: seed variance cannot be estimated (fewer than {MIN_SEEDS}), so this verdict is "
                    "about these trained models only")
        return f"{seeds}, {self.design}; seeds and questions as random effects"


# ---- inputs ----


def outcome_matrix(per_seed: Mapping[int, Mapping[str, bool]], arm: str = "arm") -> tuple[
    tuple[int, ...], tuple[str, ...], np.ndarray
]:
    """(seeds, question ids, matrix): the matrix is (n_seeds, n_questions) bool, both axes sorted."""
    if not per_seed:
        raise CompareError(f"arm {arm!r}: no seeds; give at least one seed's outcomes")
    seeds = tuple(sorted(per_seed))
    questions = tuple(sorted(per_seed[seeds[0]]))
    if not questions:
        raise CompareError(f"arm {arm!r} seed {seeds[0]}: no questions")
    for seed in seeds[1:]:
        if set(per_seed[seed]) != set(questions):
            odd = sorted(set(per_seed[seed]) ^ set(questions))
            raise CompareError(
                f"arm {arm!r} seed {seed}: {len(odd)} question ids differ from seed {seeds[0]} "
                f"(e.g. {odd[0]!r}); every seed must score the same questions"
            )
    matrix = np.array([[bool(per_seed[seed][q]) for q in questions] for seed in seeds], dtype=bool)
    return seeds, questions, matrix


# ---- exact tests ----


def mcnemar_exact_p(arm_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(n = discordant pairs, 1/2) test, computed exactly.

    p = min(1, 2 * P(X <= min(b, c))); for a fair coin doubling the smaller tail equals summing every outcome
    as unlikely as the observed one. No discordant pairs gives p = 1.
    """
    if arm_only < 0 or baseline_only < 0:
        raise CompareError(f"discordant counts must be >= 0, got {arm_only} and {baseline_only}")
    n = arm_only + baseline_only
    tail = sum(math.comb(n, k) for k in range(min(arm_only, baseline_only) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))  # exact until the final rounding


def discordant_counts(arm: np.ndarray, baseline: np.ndarray) -> tuple[int, int]:
    """(arm right and baseline wrong, arm wrong and baseline right) over paired boolean vectors."""
    return int(np.sum(arm & ~baseline)), int(np.sum(~arm & baseline))


def question_sign_test_p(arm: np.ndarray, baseline: np.ndarray) -> float:
    """Exact sign test over questions: does the arm's per-question accuracy (over its seeds) beat the baseline's
    on more questions than chance allows? With one seed each it is exactly McNemar's test.

    The questions are the independent unit here and the models are taken as given: the test says nothing about
    other training seeds. Integer arithmetic, so arms with different seed counts compare exactly.
    """
    arm_right = arm.astype(int).sum(axis=0) * baseline.shape[0]  # (questions,), scaled to a common seed count
    base_right = baseline.astype(int).sum(axis=0) * arm.shape[0]
    return mcnemar_exact_p(int(np.sum(arm_right > base_right)), int(np.sum(arm_right < base_right)))


# ---- summaries and comparisons ----


def summarize_arm(
    arm: str, correct: Mapping[int, Mapping[str, bool]], format_ok: Mapping[int, Mapping[str, bool]] | None = None
) -> ArmSummary:
    """Accuracy of one arm (and its format accuracy when `format_ok` is given), with intervals."""
    seeds, questions, matrix = outcome_matrix(correct, arm)
    format_accuracy = format_ci = None
    if format_ok is not None:
        _, _, formats = outcome_matrix(format_ok, arm)
        format_accuracy = float(formats.mean())
        format_ci = accuracy_interval(formats)
    return ArmSummary(
        arm=arm,
        seeds=seeds,
        n_questions=len(questions),
        accuracy=float(matrix.mean()),
        ci=accuracy_interval(matrix),
        seed_accuracies=tuple(float(row.mean()) for row in matrix),
        format_accuracy=format_accuracy,
        format_ci=format_ci,
    )


def summarize_arms(correct: Outcomes, format_ok: Outcomes | None = None) -> list[ArmSummary]:
    """`summarize_arm` for every arm of `correct`, in its order; arms missing from `format_ok` get no format."""
    return [summarize_arm(arm, per_seed, None if format_ok is None else format_ok.get(arm))
            for arm, per_seed in correct.items()]


def compare_arms(correct: Outcomes, arm: str, baseline: str, alpha: float = ALPHA, paired: bool = False) -> Comparison:
    """`arm` minus `baseline`: mean difference in points, its interval and test (see the module doc).

    paired: the arms share a trained stage per seed (same seeds required); the analysis runs on per-cell
    differences. Without it the arms are compared unpaired. Below MIN_SEEDS seeds: exact sign test over questions.
    """
    arm_seeds, arm_questions, arm_matrix = outcome_matrix(_arm(correct, arm), arm)
    base_seeds, base_questions, base_matrix = outcome_matrix(_arm(correct, baseline), baseline)
    if arm_questions != base_questions:
        odd = sorted(set(arm_questions) ^ set(base_questions))
        raise CompareError(f"arms {arm!r} and {baseline!r} score different questions ({len(odd)} differ, e.g. "
                         f"{odd[0]!r}); compare runs on the same test set")
    if paired and arm_seeds != base_seeds:
        raise CompareError(f"arms {arm!r} and {baseline!r} are paired by seed but have different seeds "
                         f"{arm_seeds} and {base_seeds}")
    n_seeds = min(len(arm_seeds), len(base_seeds))
    if n_seeds < MIN_SEEDS:
        design = QUESTIONS_ONLY
        estimate = unpaired_difference(arm_matrix, base_matrix)
        p_value = question_sign_test_p(arm_matrix, base_matrix)
    elif paired:
        design = PAIRED
        estimate = crossed_estimate(arm_matrix.astype(int) - base_matrix.astype(int))
        p_value = estimate.p_value()
    else:
        design = UNPAIRED
        estimate = unpaired_difference(arm_matrix, base_matrix)
        p_value = estimate.p_value()
    seed_tests = []
    if arm_seeds == base_seeds:
        for row, seed in enumerate(arm_seeds):
            arm_only, baseline_only = discordant_counts(arm_matrix[row], base_matrix[row])
            seed_tests.append(SeedTest(seed, arm_only, baseline_only, mcnemar_exact_p(arm_only, baseline_only)))
    difference = Fraction(int(arm_matrix.sum()), arm_matrix.size) - Fraction(int(base_matrix.sum()), base_matrix.size)
    low, high = estimate.interval()
    return Comparison(
        arm=arm,
        baseline=baseline,
        difference=float(100 * difference) + 0.0,  # exact fractions: 45 of 900 cells is exactly 5.0 points
        ci=(100.0 * low + 0.0, 100.0 * high + 0.0),
        p_value=p_value,
        seed_tests=tuple(seed_tests),
        alpha=alpha,
        n_seeds=n_seeds,
        design=design,
    )


def compare_with_baseline(correct: Outcomes, baseline: str, paired_arms: Sequence[str] = (),
                          alpha: float = ALPHA) -> list[Comparison]:
    """Every other arm against `baseline`, with Holm's correction over them (arms in `paired_arms` are paired)."""
    _arm(correct, baseline)
    comparisons = [compare_arms(correct, arm, baseline, alpha, paired=arm in paired_arms)
                   for arm in correct if arm != baseline]
    if len(comparisons) < 2:
        return comparisons
    adjusted = holm_adjust([c.p_value for c in comparisons])
    return [_replace(c, p_adjusted=p, n_compared=len(comparisons)) for c, p in zip(comparisons, adjusted)]


def arms_sharing_a_stage(correct: Outcomes, stage_keys: Mapping[tuple[str, int], Sequence[str]],
                         baseline: str) -> list[str]:
    """Arms to pair with `baseline`: the same seeds, and under every seed a trained stage in common.

    stage_keys: (arm, seed) -> the stage keys of that checkpoint's lineage (its own stage and those it started
    from); SFTKey-Tag's stage 1 is SFT-Tag's, so the two meet. Unknown lineages never pair.
    """
    seeds = set(_arm(correct, baseline))
    return [arm for arm, per_seed in correct.items()
            if arm != baseline and set(per_seed) == seeds
            and all(set(stage_keys.get((arm, s), ())) & set(stage_keys.get((baseline, s), ())) for s in seeds)]


def _replace(comparison: Comparison, **changes) -> Comparison:
    from dataclasses import replace

    return replace(comparison, **changes)


def _arm(correct: Outcomes, arm: str) -> Mapping[int, Mapping[str, bool]]:
    if arm not in correct:
        raise CompareError(f"unknown arm {arm!r}; the outcomes hold {sorted(correct)}")
    return correct[arm]


def _clipped(interval: tuple[float, float]) -> tuple[float, float]:
    """An interval of a fraction, cut to [0, 1] (the t interval does not know accuracy is bounded)."""
    return max(0.0, interval[0]) + 0.0, min(1.0, interval[1]) + 0.0


# ---- reports ----


def to_markdown(summaries: Sequence[ArmSummary], comparisons: Sequence[Comparison] = ()) -> str:
    """A table of arms (accuracy as fractions, 95% intervals, seed sd) and one verdict line per comparison.

    Format accuracy is `n/a` for arms without a judged format (the plain arm).
    """
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
            **{
                **{k: v for k, v in c.items() if k not in ("verdict", "significant")},
                "ci": tuple(c["ci"]),
                "seed_tests": tuple(SeedTest(**t) for t in c["seed_tests"]),
            }
        )
        for c in payload["comparisons"]
    ]
    return summaries, comparisons


# The files of a report folder (`sftkey compare --out`, the arm_comparison asset, the DVC compare stage).
REPORT_MD = "comparison.md"  # the table and verdict lines
REPORT_JSON = "comparison.json"  # summaries and comparisons (from_json reads it back)
METRICS_JSON = "metrics.json"  # flat per-arm numbers: DVC metrics
ACCURACY_CSV = "accuracy.csv"  # one row per arm: DVC plots
ACCURACY_PNG = "accuracy.png"
LOSS_DIR = "answer_loss"  # <arm>.csv (step, answer_loss) per arm: DVC plots
LOSS_PNG = "answer_loss.png"


@dataclass
class Report:
    """What `write_report` computed and wrote."""

    summaries: list[ArmSummary]
    comparisons: list[Comparison]
    table: str  # Markdown: the table, verdict lines, then a `warning: ...` paragraph per warning
    files: list[Path]
    plots: list[Path]


def write_report(out: str | Path, correct: Outcomes, formats: Outcomes | None,
                 stage_keys: Mapping[tuple[str, int], Sequence[str]], baseline: str,
                 curves: Mapping[str, Sequence[tuple[float, float]]] | None = None, warnings: Sequence[str] = (),
                 alpha: float = ALPHA) -> Report:
    """Summarize every arm, compare the others with `baseline` (arms sharing a stage with it paired by seed,
    Holm-corrected at `alpha`) and write the report files into `out`, each atomically.

    formats: format outcomes of the arms whose format is judged; curves: arm -> [(step, answer loss)], plotted
    (answer_loss.png) and written per arm (answer_loss/<arm>.csv) when given.
    """
    out = Path(out)
    summaries = summarize_arms(correct, formats)
    comparisons = compare_with_baseline(correct, baseline, arms_sharing_a_stage(correct, stage_keys, baseline), alpha)
    table = to_markdown(summaries, comparisons) + "".join(f"\nwarning: {w}\n" for w in warnings)
    files = [write_text(out / REPORT_MD, table), to_json(out / REPORT_JSON, summaries, comparisons),
             write_text(out / METRICS_JSON, json.dumps(flat_metrics(summaries, comparisons), indent=2) + "\n"),
             write_text(out / ACCURACY_CSV, accuracy_csv(summaries))]
    files += write_loss_csvs(out / LOSS_DIR, curves or {})
    plots = [plot_accuracy(summaries, out / ACCURACY_PNG)]
    if curves:
        plots.append(plot_loss_curves(curves, out / LOSS_PNG))
    else:
        (out / LOSS_PNG).unlink(missing_ok=True)  # an earlier report's curves are not this one's
    return Report(summaries, comparisons, table, files, plots)


def flat_metrics(summaries: Sequence[ArmSummary], comparisons: Sequence[Comparison]) -> dict[str, dict[str, float]]:
    """{arm: {accuracy, format_accuracy, ci_low, ci_high, difference_points, p_value}}: numbers only (what DVC
    shows). format_accuracy only where the format is judged; difference_points and p_value (the one the verdict
    rests on: Holm-adjusted when several arms are compared) only for the arms compared with the baseline."""
    metrics = {}
    for s in summaries:
        metrics[s.arm] = {"accuracy": s.accuracy, "ci_low": s.ci[0], "ci_high": s.ci[1]}
        if s.format_accuracy is not None:
            metrics[s.arm]["format_accuracy"] = s.format_accuracy
    for c in comparisons:
        metrics[c.arm] |= {"difference_points": c.difference,
                           "p_value": c.p_value if c.p_adjusted is None else c.p_adjusted}
    return metrics


def accuracy_csv(summaries: Sequence[ArmSummary]) -> str:
    lines = ["arm,accuracy,ci_low,ci_high"] + [f"{s.arm},{s.accuracy!r},{s.ci[0]!r},{s.ci[1]!r}" for s in summaries]
    return "\n".join(lines) + "\n"


def write_loss_csvs(folder: Path, curves: Mapping[str, Sequence[tuple[float, float]]]) -> list[Path]:
    """answer_loss/<arm>.csv per arm (step, answer_loss); CSVs of arms not in `curves` are removed."""
    written = [write_text(folder / f"{arm}.csv", "step,answer_loss\n" + "".join(
        f"{step!r},{loss!r}\n" for step, loss in points)) for arm, points in curves.items()]
    for stale in set(folder.glob("*.csv")) - set(written):
        stale.unlink()
    return written


def plot_accuracy(summaries: Sequence[ArmSummary], path: str | Path) -> Path:
    """PNG bar chart: accuracy and format accuracy per arm, with their intervals as error bars."""
    figure, axes = _figure()
    positions = np.arange(len(summaries))
    width = 0.38
    bars = [("accuracy", [(s.accuracy, s.ci) for s in summaries], -width / 2)]
    if any(s.format_accuracy is not None for s in summaries):  # no bar where the format is not judged
        formats = [(math.nan, (math.nan, math.nan)) if s.format_accuracy is None else (s.format_accuracy, s.format_ci)
                   for s in summaries]
        bars.append(("format accuracy", formats, width / 2))
    for label, values, offset in bars:
        heights = np.array([v for v, _ in values])
        errors = np.array([[v - ci[0] for v, ci in values], [ci[1] - v for v, ci in values]]).clip(min=0)
        axes.bar(positions + offset, heights, width, yerr=errors, capsize=4, label=label)
    axes.set_xticks(positions, [s.arm for s in summaries], rotation=20, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel(f"fraction ({LEVEL:.0%} interval)")
    axes.legend()
    return _save(figure, path)


@dataclass(frozen=True)
class CurveSegment:
    """A stretch of the answer-loss curves: points several arms share (a stage they trained once, together) or one
    arm's own continuation (beginning at the last shared point, so the lines join)."""

    arms: tuple[str, ...]
    points: tuple[tuple[float, float], ...]
    joins: bool = False  # starts where a shared stretch ends (marked on the plot: the arms part there)

    @property
    def label(self) -> str:
        return self.arms[0] if len(self.arms) == 1 else f"{', '.join(self.arms)} (shared)"


def curve_segments(curves: Mapping[str, Sequence[tuple[float, float]]]) -> list[CurveSegment]:
    """Split the curves where they part: a prefix that arms share (SFTKey-Tag's stage 1 is SFT-Tag's) is one
    segment, drawn once, so no arm's line hides another's."""
    for arm, points in curves.items():
        if not points:
            raise CompareError(f"loss curve of arm {arm!r} is empty")
    curves = {arm: [tuple(point) for point in points] for arm, points in curves.items()}
    segments: list[CurveSegment] = []

    def grow(arms: list[str], start: int) -> None:  # `arms` agree on their first `start` points
        groups: dict[tuple, list[str]] = {}
        for arm in arms:
            if len(curves[arm]) > start:
                groups.setdefault(curves[arm][start], []).append(arm)
        for group in groups.values():
            end = start + 1
            while all(len(curves[a]) > end for a in group) and len({curves[a][end] for a in group}) == 1:
                end += 1
            segments.append(CurveSegment(tuple(group), tuple(curves[group[0]][max(start - 1, 0):end]), start > 0))
            grow(group, end)

    grow(list(curves), 0)
    return segments


def draw_loss_curves(axes, curves: Mapping[str, Sequence[tuple[float, float]]]) -> list:
    """Draw the curves' segments on `axes`: shared stretches once in grey, on top, each arm's own part in its
    colour with a dot where it leaves the shared stretch. Returns the Line2D objects, one per segment."""
    colours = {arm: f"C{k}" for k, arm in enumerate(curves)}
    lines = []
    for segment in curve_segments(curves):
        steps, losses = zip(*segment.points)
        shared = len(segment.arms) > 1
        (line,) = axes.plot(steps, losses, label=segment.label, color="0.25" if shared else colours[segment.arms[0]],
                            linewidth=2.5 if shared else 1.5, zorder=3 if shared else 2,
                            marker="o" if segment.joins else None, markevery=[0] if segment.joins else None)
        lines.append(line)
    return lines


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """PNG line chart of answer-span loss against training step, per arm (log scale when all > 0)."""
    figure, axes = _figure()
    draw_loss_curves(axes, curves)
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
    """The PNG through a temp file in the same folder, then renamed over `path` (never half an image)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return _write_bytes(Path(path), buffer.getvalue())


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _signed(value: float) -> str:
    return f"{value + 0.0:+.1f}"


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _format_p(p: float) -> str:
    """Two significant digits (`0.11`, `6.1e-05`); `1.0` rather than `1`."""
    text = f"{p:.2g}"
    return f"{text}.0" if text.isdigit() else text
