"""Run lm-evaluation-harness tasks on a checkpoint, offline, and return one flat metrics dict.

    python -m evals.run --checkpoint DIR [--tasks gsm8k_tagged,gsm8k] [--limit 50]

Tasks: the tagged ones in `evals/tasks/` (gsm8k_tagged, svamp_tagged, math500_tagged; the stock `lm_eval` CLI
runs them too, see their YAML) and lm-eval's built-in `gsm8k` (5-shot, the standard reference). All read sftkey's
own records (evals/tasks/utils.py, as lm-eval's `custom_dataset`), so questions and gold answers are exactly those
`sftkey eval` uses; this module passes the question choice as lm-eval metadata and the cap as `gen_kwargs`.
Metric names have no commas: `gsm8k_tagged/exact_match_strict-match`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sftkey.evaluate import default_max_new_tokens

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TAGGED_TASKS = {"gsm8k_tagged": "gsm8k", "svamp_tagged": "svamp", "math500_tagged": "math500"}  # task -> data set
REFERENCE_TASK = "gsm8k"  # lm-eval's built-in GSM8K, 5-shot from the train split
STRICT_FILTER = "strict-match"
NO_MATCH = "[invalid]"  # what lm-eval's regex filter returns when the pattern finds nothing


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


def task_metadata(config: BenchConfig) -> dict:
    """Which questions the tasks' `custom_dataset` loads (evals/tasks/utils.py): lm-eval's `--metadata`."""
    return {"split": config.split, "seed": config.seed, "limit": config.limit, "data_path": config.data_path}


def reference_task() -> dict:
    """lm-eval's built-in gsm8k (5-shot from train), its rows read by sftkey's loader instead of the hub."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from evals.tasks.utils import gsm8k_reference

    spec = load_yaml(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml")
    for key in ("dataset_path", "dataset_name", "tag"):  # no hub repo; no tag pulling in other tasks
        spec.pop(key, None)
    spec["custom_dataset"] = gsm8k_reference
    spec["generation_kwargs"] = dict(spec["generation_kwargs"], max_gen_toks=default_max_new_tokens("gsm8k"))
    return spec


def run(config: BenchConfig) -> dict:
    """lm-eval's results dict for the tasks (with `samples` when `log_samples`)."""
    from sftkey.evaluate import check_checkpoint, resolve_device

    folder = check_checkpoint(config.checkpoint)  # before the slow lm_eval import: a bad folder fails fast
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(folder), dtype=config.dtype, batch_size=config.batch_size,
                 device=resolve_device(config.device), use_safetensors=True)  # passed to from_pretrained
    return simple_evaluate(
        model=model,
        tasks=[reference_task() if task == REFERENCE_TASK else task for task in config.tasks],
        # only our folder is indexed: lm-eval's ~15k built-in tasks cost seconds and gsm8k comes as a dict
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=task_metadata(config)),
        gen_kwargs={"max_gen_toks": config.max_new_tokens} if config.max_new_tokens else None,
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


def strict_answers(results: dict, task: str) -> dict[str, str | None]:
    """uid -> the answer strict-match read from each response, None where none (sftkey's `pred_strict`)."""
    return {s["doc"]["uid"]: None if s["filtered_resps"][0] == NO_MATCH else s["filtered_resps"][0]
            for s in results["samples"][task] if s["filter"] == STRICT_FILTER}


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
