"""Calibration of `sftkey compare`'s verdicts: false-positive rate and power, by simulation.

Each simulated experiment trains no model: it draws the per-question outcomes that trained models would have and
hands them to `sftkey.compare.compare_with_baseline`, the function `sftkey compare` and the pipeline's
`arm_comparison` call, then counts how often the verdict says "significant".

The world simulated (defaults in `World`): 300 test questions, drawn anew per experiment, with difficulty logits
~ N(0, 1) (mean accuracy about 0.5); 3 seeds per arm; each trained model (arm, seed) gets its own seed effect
~ N(0, seed_sd^2) on the logit of every question; each (model, question) outcome is then a coin with that
probability. An arm that "shares a stage" with the baseline (SFTKey-Tag continuing SFT-Tag's stage 1) is a
perturbation of the baseline's model of the same seed: it carries that model's seed effect plus a small own one
(sd 0.1) and draws its coins with the same random numbers, so it answers differently only where its probability
moved across them; it is compared paired by seed.

    python benchmarks/verdict_calibration.py                  # 400 experiments per row (~2 min on 2 CPU cores)
    python benchmarks/verdict_calibration.py --experiments 2000

Rows: the null (equal true accuracy) at several seed sds, the alternative (+0.45 logit), the shared-stage design,
the family-wise error over 6 arms compared with one baseline (Holm), and, for contrast, the exact sign test over
questions (what compare used before: valid for these trained models only) and a 1-seed experiment. Each rate has
a 95% Wilson interval. The numbers are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sftkey.compare import ALPHA, compare_with_baseline, question_sign_test_p, wilson_interval  # noqa: E402

BASELINE = "baseline"


@dataclass(frozen=True)
class World:
    """What one simulated experiment looks like."""

    questions: int = 300
    seeds: int = 3
    arms: int = 1  # arms compared with the baseline
    seed_sd: float = 0.0  # sd of each trained model's logit shift
    effect: float = 0.0  # logit shift of every compared arm over the baseline (0: the null)
    difficulty_sd: float = 1.0  # sd of the question difficulty logits
    shared_stage: bool = False  # compared arms reuse the baseline's stage (its seed effect) and are paired
    own_sd: float = 0.1  # with shared_stage: the extra seed effect of the arm's own stage


def simulate_outcomes(world: World, rng: np.random.Generator) -> dict[str, dict[int, dict[str, bool]]]:
    """arm -> seed -> question id -> correct, for the baseline and `world.arms` compared arms."""
    difficulty = rng.normal(0.0, world.difficulty_sd, world.questions)  # (questions,)
    base_shift = rng.normal(0.0, world.seed_sd, world.seeds)  # (seeds,)
    ids = [f"q{q:04d}" for q in range(world.questions)]
    shifts = {BASELINE: base_shift}
    for k in range(world.arms):
        if world.shared_stage:
            own = base_shift + rng.normal(0.0, world.own_sd, world.seeds)
        else:
            own = rng.normal(0.0, world.seed_sd, world.seeds)
        shifts[f"arm{k}"] = own + world.effect
    base_coins = rng.random((world.seeds, world.questions))
    outcomes = {}
    for arm, shift in shifts.items():
        probability = 1.0 / (1.0 + np.exp(-(difficulty[None, :] + shift[:, None])))  # (seeds, questions)
        coins = base_coins if arm == BASELINE or world.shared_stage else rng.random(probability.shape)
        correct = coins < probability
        outcomes[arm] = {seed: dict(zip(ids, map(bool, row))) for seed, row in enumerate(correct)}
    return outcomes


def significant_share(world: World, experiments: int, seed: int, sign_test: bool = False) -> tuple[int, int]:
    """(experiments where any compared arm is called significant, experiments).

    sign_test: judge by the exact sign test over questions instead (the contrast row), one arm only.
    """
    rng = np.random.default_rng(seed)
    paired = [f"arm{k}" for k in range(world.arms)] if world.shared_stage else []
    hits = 0
    for _ in range(experiments):
        outcomes = simulate_outcomes(world, rng)
        if sign_test:
            arm, base = (np.array([list(s.values()) for s in outcomes[a].values()]) for a in ("arm0", BASELINE))
            hits += question_sign_test_p(arm, base) < ALPHA
        else:
            hits += any(c.significant for c in compare_with_baseline(outcomes, BASELINE, paired))
    return hits, experiments


def rows(experiments: int) -> list[tuple[str, str, World, bool]]:
    """(what, rate name, world, sign test) of every row of the table."""
    null = World()
    alternative = replace(null, effect=0.45)
    out = [(f"null, seed sd {sd}", "false positives", replace(null, seed_sd=sd), False) for sd in (0.0, 0.1, 0.3, 0.5, 0.8)]
    out += [(f"+0.45 logit, seed sd {sd}", "power", replace(alternative, seed_sd=sd), False) for sd in (0.0, 0.3, 0.8)]
    out += [(f"+0.45 logit, seed sd {sd}, 5 seeds", "power", replace(alternative, seed_sd=sd, seeds=5), False)
            for sd in (0.0, 0.3)]
    out += [
        ("shared stage, null, seed sd 0.8", "false positives", replace(null, seed_sd=0.8, shared_stage=True), False),
        ("shared stage, +0.1 logit, seed sd 0.8", "power", replace(null, effect=0.1, seed_sd=0.8, shared_stage=True),
         False),
        ("shared stage, +0.45 logit, seed sd 0.8", "power", replace(alternative, seed_sd=0.8, shared_stage=True), False),
        ("6 arms vs baseline, null, seed sd 0.5", "family-wise errors", replace(null, seed_sd=0.5, arms=6), False),
        ("contrast: sign test over questions, null, seed sd 0.8", "false positives", replace(null, seed_sd=0.8), True),
        ("contrast: 1 seed, null, seed sd 0.8", "false positives", replace(null, seed_sd=0.8, seeds=1), False),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=400, help="simulated experiments per row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    args = parser.parse_args(argv)
    print(f"alpha {ALPHA}; {args.experiments} experiments per row; 300 questions, 3 seeds per arm unless said")
    print("| experiment | rate | share significant | 95% interval |")
    print("|---|---|---|---|")
    started = time.perf_counter()
    for i, (what, rate, world, sign_test) in enumerate(rows(args.experiments)):
        hits, n = significant_share(world, args.experiments, args.seed + 1000 * i, sign_test)
        low, high = wilson_interval(hits, n)
        print(f"| {what} | {rate} | {hits / n:.3f} ({hits}/{n}) | [{low:.3f}, {high:.3f}] |", flush=True)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
