"""The `moeflow` command line.

Each subcommand lives beside the code it drives, in a module that exposes
`add_arguments(parser)` and `main(args) -> int`. Modules are imported only to build
the parser, and keep their heavy imports (torch, transformers) inside `main`, so that
`moeflow --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys

from moeflow.commands.common import add_subcommands
from moeflow.errors import MoeflowError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("moeflow.commands.generate", "generate text from a prompt, streaming to stdout"),
    "inspect": ("moeflow.commands.inspect", "describe a checkpoint and what an expert budget holds"),
    "serve": ("moeflow.server.cli", "serve a model behind an OpenAI-compatible HTTP API"),
    "bench": ("moeflow.bench.cli", "benchmarks: offline engine configurations, or a running server"),
    "trace": ("moeflow.commands.trace", "record the expert routes a model takes over a data split"),
    "predictor": ("moeflow.commands.predictor", "train a routing-path predictor from traces, or score one"),
    "data": ("moeflow.data.cli", "build the public-text training corpus"),
    "train": ("moeflow.train.cli", "train a reference MoE model with transformers"),
    "eval": ("moeflow.commands.eval", "accuracy of approximate routing: perplexity, agreement, multiple choice"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeflow",
        description="Run and serve Mixture-of-Experts models whose experts do not fit in GPU memory.",
    )
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), COMMANDS, "_main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        return 130
    except MoeflowError as exc:
        print(f"moeflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
