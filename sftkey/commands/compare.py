"""`sftkey compare RUN_DIR...`: accuracy of each arm over its seeds with bootstrap intervals, paired tests
against a baseline arm, a Markdown table with verdict lines, `compare.json` and a PNG.

Each RUN_DIR is an output folder of `sftkey eval` (with summary.json and outputs.jsonl) or a folder holding
such folders. Runs are grouped by the arm and seed their summary records. Where an evaluated checkpoint sits in
a training run (`<run>/checkpoints/<name>/`, with `<run>/metrics.jsonl`), the arm's answer-span training loss
is plotted too (`answer_loss.png`, the lowest seed of each arm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sftkey.evaluate import OUTPUTS, SUMMARY

CORRECT_FIELDS = {"strict": "strict_correct", "lenient": "lenient_correct"}


class CompareError(ValueError):
    """The runs cannot be compared; the message names the folders and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="`sftkey eval` output folders, or folders holding them (searched recursively)")
    parser.add_argument("--baseline", default=None, help="arm the others are compared with (default: the first arm found)")
    parser.add_argument("--metric", choices=sorted(CORRECT_FIELDS), default="strict",
                        help="which correctness to compare (strict: the Answer block; lenient: also the last number)")
    parser.add_argument("--out", default="compare", help="folder for compare.json and accuracy.png (default: ./compare)")
    parser.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default: sftkey.compare's)")


def find_runs(paths: list[str]) -> list[Path]:
    """Folders holding a summary.json: each path itself, or every one below it."""
    runs = []
    for path in map(Path, paths):
        found = [path] if (path / SUMMARY).is_file() else sorted(p.parent for p in path.rglob(SUMMARY))
        if not found:
            raise CompareError(f"{path}: no {SUMMARY} in it or below it; pass the output folders of `sftkey eval`")
        runs.extend(found)
    return runs


def training_log(checkpoint: str | None) -> Path | None:
    """The `metrics.jsonl` of the training run that wrote `checkpoint`, if it is one of the trainer's."""
    log = Path(checkpoint).parent.parent / "metrics.jsonl" if checkpoint else None
    return log if log and log.is_file() else None


def answer_loss_curves(runs: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """arm -> [(step, answer loss)] from the training log of the arm's lowest evaluated seed."""
    from sftkey.train.tracking import read_metrics

    logs: dict[str, tuple[int, Path]] = {}
    for run in runs:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
        log = training_log(summary.get("checkpoint"))
        seed = int(summary["seed"])
        if log and (summary["arm"] not in logs or seed < logs[summary["arm"]][0]):
            logs[summary["arm"]] = (seed, log)
    curves = {}
    for arm, (_, log) in logs.items():
        points = [(row["step"], row["loss_answer"]) for row in read_metrics(log) if "loss_answer" in row]
        if points:
            curves[arm] = points
    return curves


def load_outcomes(runs: list[Path], field: str) -> tuple[dict, dict]:
    """(correct, format_ok) as arm -> seed -> uid -> bool, checking that all runs scored the same data set."""
    from sftkey.evaluate import read_outputs

    correct: dict = {}
    format_ok: dict = {}
    where: dict = {}
    data = {}
    for run in runs:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
        if not summary.get("complete"):
            raise CompareError(
                f"{run}: unfinished evaluation ({summary.get('n')} of {summary.get('n_questions')} questions); "
                "rerun its `sftkey eval` command to finish it"
            )
        data[run] = (summary["dataset"], summary["split"], summary["data_version"])
        arm, seed = summary["arm"], int(summary["seed"])
        if (arm, seed) in where:
            raise CompareError(f"{where[arm, seed]} and {run} are both arm {arm!r} seed {seed}; pass only one of them")
        where[arm, seed] = run
        rows = read_outputs(run / OUTPUTS)
        correct.setdefault(arm, {})[seed] = {r["uid"]: bool(r[field]) for r in rows}
        format_ok.setdefault(arm, {})[seed] = {r["uid"]: bool(r["format_ok"]) for r in rows}
    if len(set(data.values())) > 1:
        listing = "; ".join(f"{run}: {d[0]}-{d[1]} ({d[2][:8]})" for run, d in data.items())
        raise CompareError(f"the runs scored different questions ({listing}); compare one data set at a time")
    return correct, format_ok


def run(args: argparse.Namespace) -> int:
    from sftkey import compare

    try:
        runs = find_runs(args.runs)
        correct, format_ok = load_outcomes(runs, CORRECT_FIELDS[args.metric])
        baseline = args.baseline or next(iter(correct))
        if baseline not in correct:
            raise CompareError(f"--baseline {baseline!r} is not among the arms {sorted(correct)}")
        resamples = {"n_resamples": args.resamples} if args.resamples else {}
        summaries = compare.summarize_arms(correct, format_ok, **resamples)
        comparisons = [compare.compare_arms(correct, arm, baseline, **resamples) for arm in correct if arm != baseline]
    except ValueError as e:  # CompareError and sftkey.compare's checks (seeds or questions that differ)
        print(f"sftkey compare: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(compare.to_markdown(summaries, comparisons), end="")
    written = [compare.to_json(out / "compare.json", summaries, comparisons),
               compare.plot_accuracy(summaries, out / "accuracy.png")]
    curves = answer_loss_curves(runs)
    if curves:
        written.append(compare.plot_loss_curves(curves, out / "answer_loss.png"))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
