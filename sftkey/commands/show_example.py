"""`sftkey show-example`: one prepared example, its tokens coloured by role, so a person can check the masks."""

from __future__ import annotations

import argparse
import os
import sys

from sftkey.roles import ROLE_NAMES

# ANSI colours per role: prompt grey, thinking blue, answer green (bold), eos magenta.
COLOURS = ("\033[90m", "\033[34m", "\033[1;32m", "\033[35m")
RESET = "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prepared", help="a folder written by `sftkey prepare`")
    parser.add_argument("--index", type=int, default=0, help="which example (0-based)")
    parser.add_argument("--uid", default=None, help="pick the example by id instead of --index")
    parser.add_argument("--model", default=None, help="tokenizer (default: the one the data was prepared with)")
    parser.add_argument("--no-color", action="store_true", help="mark roles with [role| ] brackets instead of colour")


def render_tokens(pieces: list[str], roles: list[int], color: bool) -> str:
    """Token strings joined, each coloured by role (or bracketed per run of one role without colour)."""
    if color:
        return "".join(f"{COLOURS[r]}{p}{RESET}" for p, r in zip(pieces, roles))
    out, current = [], None
    for piece, role in zip(pieces, roles):
        if role != current:
            out.append(("]" if current is not None else "") + f"[{ROLE_NAMES[role]}|")
            current = role
        out.append(piece)
    return "".join(out) + "]"


def run(args: argparse.Namespace) -> int:
    from sftkey.data import DataError
    from sftkey.models import load_tokenizer
    from sftkey.prepare import read_prepared

    prepared = read_prepared(args.prepared)
    examples = prepared.examples
    if args.uid is not None:
        matches = [e for e in examples if e.uid == args.uid]
        if not matches:
            raise DataError(f"--uid {args.uid!r}: no example with that uid in {args.prepared} "
                            "(its uids are in examples.jsonl)")
        example = matches[0]
    elif 0 <= args.index < len(examples):
        example = examples[args.index]
    else:
        valid = f"give 0 to {len(examples) - 1}" if examples else "every record was excluded; see exclusions.jsonl"
        raise DataError(f"--index {args.index} out of range: {args.prepared} has {len(examples)} examples ({valid})")
    tokenizer = load_tokenizer(args.model or prepared.meta["tokenizer"])
    pieces = [tokenizer.decode([i]) for i in example.input_ids]
    color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(f"{example.uid}: {len(example.input_ids)} tokens, " + ", ".join(f"{k} {v}" for k, v in example.role_counts().items()))
    if color:
        print("legend: " + " ".join(f"{COLOURS[r]}{name}{RESET}" for r, name in enumerate(ROLE_NAMES)))
    print(render_tokens(pieces, example.roles, color))
    return 0
