"""`moeflow bench ...`: each benchmark is a module with add_arguments(parser) and main(args)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "offline": ("moeflow.bench.offline", "one process, one model: engine configurations and baselines side by side"),
    "serve": ("moeflow.bench.serve", "load a running OpenAI-compatible server and report latency and throughput"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not module_name.startswith(exc.name):
                raise
            continue
        q = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(q)
        q.set_defaults(_bench_main=module.main)


def main(args: argparse.Namespace) -> int:
    return args._bench_main(args)
