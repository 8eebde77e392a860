"""`sftkey compare RUN_DIR...`: accuracy of each arm over its seeds with intervals, seed-aware tests against a
baseline arm (Holm-corrected), a Markdown table with verdict lines, and the report folder of
`sftkey.compare.write_report` (comparison.md/.json, metrics.json and CSVs for DVC, PNG plots).

Each RUN_DIR is an output folder of `sftkey eval` (with summary.json and outputs.jsonl) or a folder holding
such folders. Runs are grouped by the arm and seed their summary records; runs of another test set or other
generation settings are refused. An arm whose checkpoints share a trained stage with the baseline's of the same
seed (their summaries' stage keys meet) is paired by seed. Where an evaluated checkpoint sits in
a training run (`<run>/checkpoints/<name>/`, with `<run>/run.json`), the arm's answer-span training loss of every
stage up to that checkpoint is plotted too (`answer_loss.png`, the lowest seed of each arm); a stage reused from
another arm's run is read from that run's log, so arms sharing stage 1 share its curve.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from sftkey.compare import ALPHA, CompareError
from sftkey.evaluate import OUTPUTS, SUMMARY

CORRECT_FIELDS = {"strict": "strict_correct", "lenient": "lenient_correct"}
# Runs compared must agree on these: the same questions (data set, split, content version), generated alike.
SAME_SETTINGS = ("dataset", "split", "data_version", "max_new_tokens", "temperature")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="`sftkey eval` output folders, or folders holding them (searched recursively)")
    parser.add_argument("--baseline", default=None, help="arm the others are compared with (default: the first arm found)")
    parser.add_argument("--metric", choices=sorted(CORRECT_FIELDS), default="strict",
                        help="which correctness to compare (strict: the Answer block; lenient: also the last number)")
    parser.add_argument("--out", default="compare", help="folder for the report files (default: ./compare)")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"family-wise significance level, Holm-corrected over the arms (default {ALPHA})")


def find_runs(paths: list[str]) -> list[Path]:
    """Folders holding a summary.json: each path itself, or every one below it."""
    runs = []
    for path in map(Path, paths):
        found = [path] if (path / SUMMARY).is_file() else sorted(p.parent for p in path.rglob(SUMMARY))
        if not found:
            raise CompareError(f"{path}: no {SUMMARY} in it or below it; pass the output folders of `sftkey eval`")
        runs.extend(found)
    return runs


def answer_loss_curve(checkpoint: str | None) -> list[tuple[int, float]]:
    """[(step, answer loss)] of every stage up to `checkpoint` in its training run; [] when it is not a trainer's."""
    from sftkey.train import checkpoint as ckpt
    from sftkey.train.layout import RUN_FILE, run_root, stage_metrics

    run_file = run_root(Path(checkpoint)) / RUN_FILE if checkpoint else None
    if run_file is None or not run_file.is_file():
        return []
    points = []
    for stage in json.loads(run_file.read_text(encoding="utf-8")).get("stages", []):
        source = Path(stage.get("reused_from") or stage["checkpoint"])  # a reused stage was logged by its own run
        name = (ckpt.read_meta(source) or {}).get("stage", stage["name"])
        points += [(row["step"], row["loss_answer"]) for row in stage_metrics(source, name) if "loss_answer" in row]
        if Path(stage["checkpoint"]) == Path(checkpoint):
            break
    return points


def answer_loss_curves(runs: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """arm -> [(step, answer loss)] from the training run of the arm's lowest evaluated seed."""
    checkpoints: dict[str, tuple[int, str]] = {}
    for run in runs:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
        seed = int(summary["seed"])
        if summary["arm"] not in checkpoints or seed < checkpoints[summary["arm"]][0]:
            checkpoints[summary["arm"]] = (seed, summary.get("checkpoint"))
    curves = {arm: answer_loss_curve(checkpoint) for arm, (_, checkpoint) in checkpoints.items()}
    return {arm: points for arm, points in curves.items() if points}


@dataclass
class Loaded:
    """What `sftkey compare` reads from the eval folders."""

    correct: dict  # arm -> seed -> uid -> correct (the chosen metric)
    format_ok: dict  # the same for format; only arms whose format is judged (tagged)
    stage_keys: dict  # (arm, seed) -> the stage keys of the checkpoint's lineage
    warnings: list[str]


def load_outcomes(runs: list[Path], field: str) -> Loaded:
    """The runs' outcomes, checking that they scored the same test set under the same generation settings."""
    from sftkey.evaluate import read_outputs

    loaded = Loaded({}, {}, {}, [])
    where: dict = {}
    settings, questions = {}, {}
    for run in runs:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
        if not summary.get("complete"):
            raise CompareError(
                f"{run}: unfinished evaluation ({summary.get('n')} of {summary.get('n_questions')} questions); "
                "rerun its `sftkey eval` command to finish it"
            )
        settings[run] = tuple(summary.get(k) for k in SAME_SETTINGS)
        arm, seed = summary["arm"], int(summary["seed"])
        if (arm, seed) in where:
            raise CompareError(f"{where[arm, seed]} and {run} are both arm {arm!r} seed {seed}; pass only one of them")
        where[arm, seed] = run
        rows = read_outputs(run / OUTPUTS)
        questions[run] = (frozenset(r["uid"] for r in rows), summary.get("training_questions_excluded") or 0)
        loaded.correct.setdefault(arm, {})[seed] = {r["uid"]: bool(r[field]) for r in rows}
        if summary.get("tagged", True):
            loaded.format_ok.setdefault(arm, {})[seed] = {r["uid"]: bool(r["format_ok"]) for r in rows}
        loaded.stage_keys[arm, seed] = frozenset(summary.get("stage_keys") or ())
        loaded.warnings += [f"{arm} seed {seed}: {w}" for w in summary.get("warnings") or ()]
    if len(set(settings.values())) > 1:
        listing = "; ".join(f"{run}: " + ", ".join(f"{k} {v}" for k, v in zip(SAME_SETTINGS, values))
                            for run, values in settings.items())
        raise CompareError(f"the runs scored different test sets or generated under different settings ({listing}); "
                           "compare runs of one test set and one generation setting at a time")
    if len({uids for uids, _ in questions.values()}) > 1:
        listing = "; ".join(f"{run}: {len(uids)} questions ({dropped} left out as training questions)"
                            for run, (uids, dropped) in questions.items())
        raise CompareError(f"the runs scored different questions ({listing}); compare runs on the same questions")
    return loaded


def run(args: argparse.Namespace) -> int:
    from sftkey import compare

    if args.alpha is not None and not 0 < args.alpha < 1:
        raise CompareError(f"--alpha {args.alpha}: give a level in (0, 1), e.g. 0.05")
    runs = find_runs(args.runs)
    loaded = load_outcomes(runs, CORRECT_FIELDS[args.metric])
    baseline = args.baseline or next(iter(loaded.correct))
    if baseline not in loaded.correct:
        raise CompareError(f"--baseline {baseline!r} is not among the arms {sorted(loaded.correct)}")
    report = compare.write_report(args.out, loaded.correct, loaded.format_ok, loaded.stage_keys, baseline,
                                  answer_loss_curves(runs), loaded.warnings, args.alpha or ALPHA)
    print(report.table, end="")
    print(f"wrote {args.out}: " + ", ".join(str(path.relative_to(args.out)) for path in report.files + report.plots))
    return 0
