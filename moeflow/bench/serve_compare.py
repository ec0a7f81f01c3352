"""`moeflow bench serve-compare`: result files of `moeflow bench serve`, side by side.

    moeflow bench serve-compare "25% random=serve-25-random.json" serve-100-random.json --plot serve.png

Each argument is `LABEL=PATH` or a path (labelled by its file name). Prints one markdown table (throughput,
TTFT, TPOT, end-to-end latency, the server's expert-cache figures) and, with --plot, draws throughput,
latency and every request's time to first token against its send time, the panel that shows stalls.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="[LABEL=]RESULT.json", help="files written by --result-file")
    p.add_argument("--plot", type=Path, default=None, help="write the comparison plot here (PNG)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here as well")


def load(specs: list[str]) -> list[tuple[str, dict]]:
    from moeflow.errors import ConfigError

    runs = []
    for spec in specs:
        label, sep, path = spec.rpartition("=")
        path = Path(path if sep else spec)
        label = label if sep else path.stem
        try:
            result = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not JSON: {exc}") from None
        missing = [k for k in ("completed", "output_throughput", "metrics", "requests") if k not in result]
        if missing:
            raise ConfigError(f"{path} is not a `moeflow bench serve` result file (no {', '.join(missing)})")
        runs.append((label, result))
    return runs


def comparison_table(runs: list[tuple[str, dict]]) -> str:
    from moeflow.markdown import table

    head = ("run", "done", "req/s", "output tok/s", "TTFT median / p99 (ms)", "TPOT median / p99 (ms)",
            "E2E median (ms)", "expert hits", "GB moved")
    rows = []
    for label, r in runs:
        m = r["metrics"]
        cache = r.get("server_expert_cache")
        rows.append([
            label, f"{r['completed']}/{r['completed'] + r['failed']}", f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:,.1f}", f"{m['ttft_ms']['median']:,.0f} / {m['ttft_ms']['p99']:,.0f}",
            f"{m['tpot_ms']['median']:,.1f} / {m['tpot_ms']['p99']:,.1f}", f"{m['e2el_ms']['median']:,.0f}",
            f"{cache['hit_rate']:.1%}" if cache else "-", f"{cache['bytes_moved'] / 1e9:,.0f}" if cache else "-",
        ])
    return table(head, rows, right_from=1) + "\n"


def plot(runs: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _ in runs]
    x = np.arange(len(runs))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.4))
    a.bar(x, [r["output_throughput"] for _, r in runs], color="tab:blue")
    a.set_ylabel("output tokens/s")
    a.set_yscale("log")
    for ax in (a, b):
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    w = 0.38
    b.bar(x - w / 2, [r["metrics"]["ttft_ms"]["median"] for _, r in runs], w, label="TTFT median")
    b.bar(x + w / 2, [r["metrics"]["ttft_ms"]["p99"] for _, r in runs], w, label="TTFT p99")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.legend(fontsize=8)
    for label, r in runs:
        done = [q for q in r["requests"] if q["success"]]
        c.scatter([q["start_s"] for q in done], [q["ttft_s"] * 1e3 for q in done], s=6, label=label)
    c.set_xlabel("request sent (s from the start of the run)")
    c.set_ylabel("time to first token (ms)")
    c.set_yscale("log")
    c.grid(alpha=0.3)
    c.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    runs = load(args.results)
    text = comparison_table(runs)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        try:
            plot(runs, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'moeflow[bench]')")
            return 1
        print(f"plot written to {args.plot}")
    return 0
