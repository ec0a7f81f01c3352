"""`moeflow bench ...`: each benchmark is a module with add_arguments(parser) and main(args)."""

from __future__ import annotations

import argparse

from moeflow.commands.common import add_subcommands

BENCHMARKS = {
    "offline": ("moeflow.bench.offline", "one process, one model: engine configurations and baselines side by side"),
    "serve": ("moeflow.bench.serve", "load a running OpenAI-compatible server and report latency and throughput"),
    "serve-compare": ("moeflow.bench.serve_compare", "set result files of `bench serve` side by side (table, plot)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_subcommands(p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True), BENCHMARKS, "_bench_main")


def main(args: argparse.Namespace) -> int:
    return args._bench_main(args)
