"""`sftkey prepare`: annotate and tokenize a data set, write it to a folder, print its summary."""

from __future__ import annotations

import argparse
import time

from sftkey.data import DataConfig, DataError


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data-selection flags shared by the commands that read a data set."""
    defaults = DataConfig()
    parser.add_argument("--dataset", default=defaults.dataset, help="gsm8k, svamp, math500 or jsonl")
    parser.add_argument("--split", default=defaults.split, help="train/test (gsm8k), all (svamp), test (math500); "
                        "single-split sets also accept train/test, carved by --seed")
    parser.add_argument("--data-path", default=None, help="explicit file or data folder (required for jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="keep at most N records (seeded sample)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of --limit sampling and carved splits")
    parser.add_argument("--question-field", default=defaults.question_field, help="jsonl: question field")
    parser.add_argument("--solution-field", default=defaults.solution_field, help="jsonl: worked-solution field")
    parser.add_argument("--answer-field", default=None, help="jsonl: final-answer field (else --answer-regex)")


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        dataset=args.dataset, split=args.split, path=args.data_path, limit=args.limit, seed=args.seed,
        question_field=args.question_field, solution_field=args.solution_field, answer_field=args.answer_field,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--model", default="default", help="tokenizer source: default (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised), tiny, a folder or a hub id")
    parser.add_argument("--format", choices=["tagged", "plain"], default="tagged", help="response format")
    parser.add_argument("--max-length", type=int, default=1024, help="exclude examples longer than this many tokens")
    parser.add_argument("--keep-calculator", action="store_true", help="GSM8K: keep <<...>> calculator annotations")
    parser.add_argument("--answer-regex", default=None, help="jsonl: regex whose group 1 is the answer")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")


def run(args: argparse.Namespace) -> int:
    from sftkey.annotate import annotation_config
    from sftkey.models import load_tokenizer
    from sftkey.prepare import PrepareConfig, prepare, summary_lines, write_prepared

    start = time.perf_counter()
    annotation = annotation_config(not args.keep_calculator, args.answer_regex)
    if args.max_length < 1:
        raise DataError(f"--max-length {args.max_length}: give a positive number of tokens, e.g. 1024")
    config = PrepareConfig(data_config(args), annotation, args.format == "tagged", args.max_length)
    prepared = prepare(config, load_tokenizer(args.model))
    out = write_prepared(prepared, args.out)
    for line in summary_lines(prepared.meta):
        print(line)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
