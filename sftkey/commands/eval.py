"""`sftkey eval`: generate answers to a data set's questions with a checkpoint, score them, write a summary.

Writes `<out>/outputs.jsonl` (one scored row per question, appended as generated) and `<out>/summary.json`;
rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math

from sftkey.commands.prepare import add_data_arguments, data_config
from sftkey.generate import GenerationConfig
from sftkey.generate_backends import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model folder (config.json, *.safetensors, tokenizer), `default` (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised) or `tiny`")
    add_data_arguments(parser)
    parser.set_defaults(split="test")
    defaults = GenerationConfig()
    parser.add_argument("--answer-regex", default=None, help="jsonl: regex whose group 1 is the gold answer")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval/<dataset>-<split>[-limitN])")
    parser.add_argument("--format", choices=["tagged", "plain"], default=None,
                        help="response format to score (default: from the checkpoint's sftkey.json, else tagged)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on new tokens per answer (default: the data set's, e.g. gsm8k 512, math500 1024)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="questions per generation batch")
    parser.add_argument("--threads", type=int, default=None,
                        help="greedy on a CPU: batches answered at once, one core each (default: one per core); "
                             "the outputs do not depend on it")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="generation engine: sftkey (default; fastest on CPU), static (static KV cache, CUDA "
                             "graphs on GPU), continuous (transformers' continuous batching), vllm (when installed)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy (default); > 0: sampled")
    parser.add_argument("--sampling-seed", type=int, default=defaults.seed, help="seed of sampled generation")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: float32; bfloat16 changes some greedy answers: "
                        "benchmarks/eval_precision.py measures how many on your model)")
    parser.add_argument("--exclude-training-questions", action="store_true",
                        help="drop questions the checkpoint trained on (counted in the summary) instead of refusing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from sftkey.annotate import annotation_config
    from sftkey.evaluate import EvalConfig, evaluate

    check_generation_flags(args)
    config = EvalConfig(
        checkpoint=args.checkpoint,
        data=data_config(args),
        annotation=annotation_config(answer_regex=args.answer_regex),
        generation=GenerationConfig(
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
            seed=args.sampling_seed, progress=not args.no_progress, backend=args.backend, threads=args.threads,
        ),
        out=args.out,
        tagged=None if args.format is None else args.format == "tagged",
        device=args.device,
        dtype=args.dtype,
        exclude_training_questions=args.exclude_training_questions,
    )
    summary = evaluate(config)
    for line in summary_lines(summary):
        print(line)
    return 0


def check_generation_flags(args: argparse.Namespace) -> None:
    """The generation flags, checked here so the message names the flag (GenerationConfig's would not)."""
    from sftkey.evaluate import EvalError

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens}: give at least 1 (or leave it out: the data set's cap)")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: give at least 1 question per batch")
    if args.threads is not None and args.threads < 1:
        raise EvalError(f"--threads {args.threads}: give at least 1 (or leave it out: one per core)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise EvalError(f"--temperature {args.temperature}: give a finite number >= 0 (0: greedy)")


def _value(metric: float | None) -> str:
    return "n/a" if metric is None else f"{metric:.3f}"  # the plain arm has no format, hence no composite


def summary_lines(summary: dict) -> list[str]:
    m = summary["metrics"]
    lines = [
        f"{summary['arm']} (seed {summary['seed']}) on {summary['dataset']}-{summary['split']}: "
        f"{summary['n']} of {summary['n_questions']} questions scored, {summary['excluded']} records excluded",
    ]
    if summary.get("training_questions_excluded"):
        lines.append(f"{summary['training_questions_excluded']} questions left out: the checkpoint trained on them")
    if m:
        lines.append(
            f"strict {m['strict_accuracy']:.3f}  lenient {m['lenient_accuracy']:.3f}  format {_value(m['format_accuracy'])}  "
            f"composite {_value(m['composite'])}  reasoning {m['mean_reasoning_chars']:.0f} chars  "
            f"length cap {m['length_cap_share']:.3f} (cap {summary['max_new_tokens']} tokens)"
        )
    lines.extend(f"warning: {w}" for w in summary.get("warnings", []))
    lines.append(f"wrote {summary['out']}")
    return lines
