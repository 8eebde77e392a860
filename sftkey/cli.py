"""The `sftkey` command line. Each subcommand lives in its own module with `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so `sftkey --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from sftkey.errors import UserError

# name -> (module, one-line help); the orchestration commands live outside the library (they need dagster/mlflow)
COMMANDS = {
    "prepare": ("sftkey.commands.prepare", "annotate and tokenize a data set; print counts, exclusions, token shares"),
    "show-example": ("sftkey.commands.show_example", "print one prepared example with its tokens coloured by role"),
    "train": ("sftkey.train.cli", "run a training job (a list of stages) from a YAML config"),
    "eval": ("sftkey.commands.eval", "generate answers with a checkpoint and score them"),
    "compare": ("sftkey.commands.compare", "compare arms x seeds: intervals, paired tests, verdicts, plots"),
    "pipeline": ("orchestration.commands.pipeline", "run the whole pipeline (Dagster assets, MLflow, DVC, registry) in this process"),
    "ui": ("orchestration.commands.ui", "start the Dagster UI (127.0.0.1:3000) and the MLflow UI (127.0.0.1:5000); Ctrl-C stops both"),
    "regress": ("orchestration.commands.regress", "run the pipeline on a fixed config; exit 1 when a metric falls below its baseline"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sftkey", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (heavy imports stay out of `sftkey --help`).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(command)
            command.set_defaults(_run=importlib.import_module(module).run)
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except UserError as error:  # the one place user errors become a line: no traceback, nothing half-written
        print(f"sftkey {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
