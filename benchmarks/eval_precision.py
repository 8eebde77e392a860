"""Does greedy evaluation in bf16 give the same per-question verdicts as fp32?

`sftkey eval` and the pipeline's benchmark score in fp32, and the registry stores a model in the dtype it was
scored in. bf16 would halve the stored bytes and is what a GPU runs fastest; whether scoring (and so serving) in
bf16 is allowed depends on one measurement: the same checkpoint, the same held-out questions, greedy, once per dtype,
then per question: is the output the same, is the strict verdict the same, is the format verdict the same.

    python benchmarks/eval_precision.py --checkpoint <model folder> [--checkpoint ...] \
        --dataset gsm8k --split test --limit 100 --work /tmp/eval-precision

Each evaluation is `sftkey.evaluate.evaluate` (the function `sftkey eval` runs) into <work>/<checkpoint>-<dtype>,
so a rerun resumes where it stopped. Prints a JSON line per checkpoint (the counts, the verdicts that flipped
and each direction's count with the exact McNemar p-value, seconds per dtype), then a markdown table on stderr.
A flip is a question fp32 and bf16 score differently; any flip means the dtype can change a verdict, so
evaluation stays in fp32. bf16 products sum in another order on another machine (GPU kernels, AMX): rerun this
there before scoring in bf16 on it. The numbers are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.peers import machine  # noqa: E402
from sftkey.compare import discordant_counts, mcnemar_exact_p  # noqa: E402
from sftkey.data import DataConfig  # noqa: E402
from sftkey.evaluate import OUTPUTS, EvalConfig, evaluate, resolve_device  # noqa: E402
from sftkey.generate import GenerationConfig  # noqa: E402

REFERENCE, CANDIDATE = "float32", "bfloat16"


@dataclass(frozen=True)
class Agreement:
    """How two evaluations of one checkpoint on the same questions compare, question by question."""

    questions: int
    same_output: int
    strict: dict  # {reference: correct count, candidate: correct count, flipped, reference_only, candidate_only, p}
    format_ok: dict | None  # the same for the format verdict; None for an untagged model


def verdict_counts(reference: dict[str, bool], candidate: dict[str, bool]) -> dict:
    """Correct counts of both, how many questions flipped each way, and McNemar's exact p over those flips."""
    uids = sorted(reference)
    candidate_only, reference_only = discordant_counts(np.array([candidate[u] for u in uids], dtype=bool),
                                                       np.array([reference[u] for u in uids], dtype=bool))
    return {REFERENCE: sum(reference.values()), CANDIDATE: sum(candidate.values()),
            "flipped": reference_only + candidate_only, "reference_only": reference_only,
            "candidate_only": candidate_only, "p": mcnemar_exact_p(candidate_only, reference_only)}


def agreement(reference_rows: list[dict], candidate_rows: list[dict]) -> Agreement:
    """Compare two evaluations' rows by question uid; they must hold the same questions."""
    reference = {row["uid"]: row for row in reference_rows}
    candidate = {row["uid"]: row for row in candidate_rows}
    if reference.keys() != candidate.keys():
        raise ValueError(f"the evaluations answered different questions: {len(reference.keys() ^ candidate.keys())} "
                         "differ; give both the same data settings")
    tagged = all(row["tagged"] for row in reference.values())
    return Agreement(
        questions=len(reference),
        same_output=sum(reference[uid]["output"] == candidate[uid]["output"] for uid in reference),
        strict=verdict_counts({u: r["strict_correct"] for u, r in reference.items()},
                              {u: r["strict_correct"] for u, r in candidate.items()}),
        format_ok=verdict_counts({u: r["format_ok"] for u, r in reference.items()},
                                 {u: r["format_ok"] for u, r in candidate.items()}) if tagged else None,
    )


def verdict(found: Agreement) -> str:
    """The decision the counts support: any flipped verdict (strict or format) keeps evaluation in fp32."""
    flips = found.strict["flipped"] + (found.format_ok["flipped"] if found.format_ok else 0)
    if flips:
        return f"bf16 changed {flips} verdicts: keep evaluation in fp32"
    return f"bf16 gave the same verdicts on all {found.questions} questions"


def evaluation(checkpoint: str, dtype: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    """The scored rows and seconds of `checkpoint` evaluated in `dtype` (resumed from <work> when already there)."""
    name = hashlib.sha1(str(Path(checkpoint).resolve()).encode()).hexdigest()[:10]
    out = Path(args.work) / f"{Path(checkpoint).name}-{name}-{dtype}"
    summary = evaluate(EvalConfig(
        checkpoint=checkpoint, out=str(out), device=args.device, dtype=dtype, tagged=args.tagged,
        data=DataConfig(args.dataset, args.split, path=args.data_path, limit=args.limit, seed=args.seed),
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)))
    rows = [json.loads(line) for line in (out / OUTPUTS).read_text(encoding="utf-8").splitlines()]
    return rows, summary["seconds"]


def markdown(results: list[dict]) -> str:
    lines = ["| checkpoint | questions | same output | strict fp32 / bf16 | strict flips (fp32 only, bf16 only) "
             "| format fp32 / bf16 | format flips | seconds fp32 / bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, f = r["strict"], r["format_ok"]
        form = (f"{f[REFERENCE]} / {f[CANDIDATE]}", f"{f['flipped']} ({f['reference_only']}, {f['candidate_only']})") \
            if f else ("n/a", "n/a")
        lines.append(f"| {r['checkpoint']} | {r['questions']} | {r['same_output']} | {s[REFERENCE]} / {s[CANDIDATE]} "
                     f"| {s['flipped']} ({s['reference_only']}, {s['candidate_only']}) | {form[0]} | {form[1]} "
                     f"| {r['seconds'][REFERENCE]} / {r['seconds'][CANDIDATE]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="model folder, `default` or `tiny`; repeat for several")
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-path", default=None, help="explicit data file or folder")
    parser.add_argument("--limit", type=int, default=100, help="questions (a seeded subsample)")
    parser.add_argument("--seed", type=int, default=0, help="of the subsample")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="None: the data set's own cap")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--device", default=None, help="cuda, cpu; None: cuda when available")
    parser.add_argument("--tagged", default=None, action=argparse.BooleanOptionalAction,
                        help="score the tagged format (default: as the checkpoint trained)")
    parser.add_argument("--work", required=True, help="folder of the evaluations (a rerun resumes them)")
    args = parser.parse_args(argv)

    print(json.dumps({"machine": machine(resolve_device(args.device))}), flush=True)
    results = []
    for checkpoint in args.checkpoint:
        (reference, reference_s), (candidate, candidate_s) = (evaluation(checkpoint, d, args)
                                                              for d in (REFERENCE, CANDIDATE))
        found = agreement(reference, candidate)
        result = {"checkpoint": checkpoint, **asdict(found),
                  "seconds": {REFERENCE: reference_s, CANDIDATE: candidate_s}}
        result["verdict"] = verdict(found)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(markdown(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
