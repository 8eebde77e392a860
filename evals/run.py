"""Run lm-evaluation-harness tasks on a checkpoint, offline, and return one flat metrics dict.

    python -m evals.run --checkpoint DIR [--tasks gsm8k_tagged,gsm8k] [--limit 50]

Tasks: the tagged ones in `evals/tasks/` (gsm8k_tagged, svamp_tagged, math500_tagged) and lm-eval's built-in
`gsm8k` (5-shot, the standard reference). Their data are written from sftkey's own records (local files, or the
hub when the loader reaches it), so questions and gold answers are exactly those `sftkey eval` uses, and the
task configs are pointed at those files: nothing is fetched from the hub. Metric names have no commas:
`gsm8k_tagged/exact_match_strict-match`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sftkey.data import DataConfig, load_records
from sftkey.evaluate import default_max_new_tokens, gold_records

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TAGGED_TASKS = {"gsm8k_tagged": "gsm8k", "svamp_tagged": "svamp", "math500_tagged": "math500"}  # task -> data set
REFERENCE_TASK = "gsm8k"  # lm-eval's built-in GSM8K, 5-shot from the train split
STRICT_FILTER = "strict-match"


@dataclass
class BenchConfig:
    """One lm-eval run: which checkpoint, which tasks, which questions."""

    checkpoint: str = field(default="default", metadata={"help": "model folder, `default` (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised) or `tiny`"})
    tasks: list[str] = field(
        default_factory=lambda: ["gsm8k_tagged"], metadata={"help": f"of {[*TAGGED_TASKS, REFERENCE_TASK]}"}
    )
    split: str = field(default="test", metadata={"help": "split of the questions (as in `sftkey eval`)"})
    limit: int | None = field(
        default=None, metadata={"help": "at most N questions, the same seeded sample as `sftkey eval --limit N`"}
    )
    seed: int = field(default=0, metadata={"help": "seed of --limit sampling and carved splits (as in `sftkey eval`)"})
    data_path: str | None = field(
        default=None, metadata={"help": "data folder laid out as ../shared/data (default: sftkey's sources)"}
    )
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "cap on new tokens per answer; None: the data set's (as in `sftkey eval`)"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu; None: cuda when available"})
    dtype: str = field(default="float32", metadata={"help": "model dtype"})
    log_samples: bool = field(default=False, metadata={"help": "keep per-example samples in the results"})

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TAGGED_TASKS and t != REFERENCE_TASK]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: choose from {[*TAGGED_TASKS, REFERENCE_TASK]}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def tagged_task_data(dataset: str, config: BenchConfig, folder: Path) -> Path:
    """The task's test file: uid, question and gold answer of each annotated record (as `sftkey eval` sees them)."""
    annotated, _ = gold_records(DataConfig(dataset, config.split, path=config.data_path, limit=config.limit, seed=config.seed))
    rows = [{"uid": a.uid, "question": a.question, "answer": a.answer} for a in annotated]
    return write_jsonl(folder / f"{dataset}-{config.split}.jsonl", rows)


def reference_task_data(config: BenchConfig, folder: Path) -> dict[str, str]:
    """Train (for the 5 shots) and test files for the built-in gsm8k, in its own row format."""
    files = {}
    for split, limit in (("train", None), (config.split, config.limit)):
        records, _ = load_records(DataConfig("gsm8k", split, path=config.data_path, limit=limit, seed=config.seed))
        rows = [{"uid": r.uid, "question": r.question, "answer": r.solution} for r in records]
        files[split] = str(write_jsonl(folder / f"gsm8k-reference-{split}.jsonl", rows))
    return files


def task_config(task: str, config: BenchConfig, folder: Path) -> dict:
    """The task's YAML as a dict, its data pointed at files written into `folder`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if task == REFERENCE_TASK:
        import lm_eval.tasks

        spec = load_yaml(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml")
        data_files = reference_task_data(config, folder)
        spec["test_split"] = config.split
    else:
        spec = load_yaml(TASKS_DIR / task / f"{task}.yaml")
        data_files = {"test": str(tagged_task_data(TAGGED_TASKS[task], config, folder))}
        spec["test_split"] = "test"
    spec.update(dataset_path="json", dataset_name=None)
    spec["dataset_kwargs"] = {"data_files": data_files, "cache_dir": str(folder / "cache")}
    dataset = TAGGED_TASKS.get(task, "gsm8k")
    spec["generation_kwargs"] = dict(spec.get("generation_kwargs") or {},
                                     max_gen_toks=config.max_new_tokens or default_max_new_tokens(dataset))
    return spec


def run(config: BenchConfig) -> dict:
    """lm-eval's results dict for the tasks (with `samples` when `log_samples`)."""
    from sftkey.evaluate import check_checkpoint, resolve_device

    folder = check_checkpoint(config.checkpoint)  # before the slow lm_eval import: a bad folder fails fast
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="sftkey-lmeval-") as work:
        tasks = [task_config(task, config, Path(work)) for task in config.tasks]
        model = HFLM(pretrained=str(folder), dtype=config.dtype, batch_size=config.batch_size,
                     device=resolve_device(config.device), use_safetensors=True)  # passed to from_pretrained
        return simple_evaluate(
            model=model,
            tasks=tasks,
            task_manager=TaskManager(include_defaults=False),  # configs come as dicts: skip indexing ~15k tasks
            apply_chat_template=True,
            log_samples=config.log_samples,
            bootstrap_iters=0,
        )


def flat_metrics(results: dict) -> dict[str, float]:
    """`{"task/metric_filter": value}` from lm-eval's results, commas replaced (MLflow refuses them)."""
    flat = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{key.replace(',', '_')}"] = value
    return flat


def strict_correct(results: dict, task: str) -> dict[str, bool]:
    """uid -> the strict-match exact_match of each example (needs a run with `log_samples`)."""
    return {s["doc"]["uid"]: bool(s["exact_match"]) for s in results["samples"][task] if s["filter"] == STRICT_FILTER}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split("\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--checkpoint", required=True, help="model folder, `default` (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised) or `tiny`")
    parser.add_argument("--tasks", default=",".join(defaults.tasks), help=f"comma-separated, of {[*TAGGED_TASKS, REFERENCE_TASK]}")
    parser.add_argument("--split", default=defaults.split, help="split of the questions")
    parser.add_argument("--limit", type=int, default=None, help="at most N questions (the same sample as `sftkey eval --limit N`)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of --limit sampling")
    parser.add_argument("--data-path", default=None, help="data folder laid out as ../shared/data (default: sftkey's sources)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on new tokens per answer (default: the data set's, as in `sftkey eval`)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=defaults.dtype, help="model dtype")
    parser.add_argument("--out", default=None, help="also write the flat metrics to this JSON file")
    args = parser.parse_args(argv)
    try:
        config = BenchConfig(
            checkpoint=args.checkpoint, tasks=args.tasks.split(","), split=args.split, limit=args.limit, seed=args.seed,
            data_path=args.data_path,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
        )
        metrics = flat_metrics(run(config))
    except ValueError as e:  # DataError, EvalError, unknown tasks: their messages say what to fix
        print(f"evals.run: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        from sftkey.atomic import write_text

        write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
