"""LYNX's trade-off over an (alpha, beta) sweep: decode throughput against perplexity, as a plot and a table.

    PYTHONPATH=. python3 tools/lynx_pareto.py --bench RESULTS.json --sweep SWEEP.jsonl --budget 100% --batch 32 \
        --out pareto.png [--md pareto.md]

RESULTS.json: `moeflow bench offline --routing exact,lynx:alpha=A:beta=B,...` (decode tokens/s per routing
configuration); SWEEP.jsonl: the JSON lines of docs/lynx/sweep.py on the same model (perplexity against exact
routing, on the same (alpha, beta) grid). Each point is one (alpha, beta): its throughput as a ratio to exact
routing in the same bench cell, its perplexity increase over exact on the sweep's documents. The points on the
Pareto front (no other point both faster and more accurate) are joined by a line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def bench_ratios(results: dict, budget: str, batch: int,
                 default: tuple[float, int] | None = None) -> dict[tuple[float, int], dict]:
    """(alpha, beta) -> {tokens_per_s, ratio, distinct} for plain LYNX cells of `budget` x `batch`; a cell of
    plain `lynx` counts as `default` (the model's own (alpha, beta)) when that is given."""
    cells = [r for r in results["runs"] if r["system"] == "moeflow" and r["budget"] == budget
             and r["batch"] == batch]
    exact = [r for r in cells if r["configuration"]["routing"] == "exact"]
    if not exact:
        raise SystemExit(f"no exact-routing cell at {budget} batch {batch} in the bench results")
    base = exact[0]["decode_tokens_per_s"]
    out = {}
    for r in cells:
        m = re.fullmatch(r"lynx:alpha=([\d.]+):beta=(\d+)", r["configuration"]["routing"])
        key = (float(m[1]), int(m[2])) if m else default if r["configuration"]["routing"] == "lynx" else None
        if key is not None:
            out[key] = {"tokens_per_s": r["decode_tokens_per_s"], "ratio": r["decode_tokens_per_s"] / base,
                        "distinct": r["distinct_experts_per_layer_step"]}
    return out


def sweep_rows(lines: list[str]) -> tuple[dict, dict[tuple[float, int], dict]]:
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    exact = next(r for r in rows if r["alpha"] is None)
    return exact, {(float(r["alpha"]), int(r["beta"])): r for r in rows
                   if r["alpha"] is not None and not r.get("w")}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x: perplexity increase, lower is better;
    y: throughput ratio, higher is better), in order of x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bench", required=True)
    p.add_argument("--sweep", required=True)
    p.add_argument("--budget", default="100%")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--md", default=None)
    p.add_argument("--title", default=None)
    p.add_argument("--lynx-default", default=None, metavar="ALPHA,BETA",
                   help="the (alpha, beta) that plain `lynx` ran at: the model's default (the bench model's is 3,1)")
    args = p.parse_args()
    default = None
    if args.lynx_default:
        a, b = args.lynx_default.split(",")
        default = (float(a), int(b))
    with open(args.bench) as f:
        speed = bench_ratios(json.load(f), args.budget, args.batch, default)
    with open(args.sweep) as f:
        exact, acc = sweep_rows(f.read().splitlines())
    keys = sorted(set(speed) & set(acc))
    if not keys:
        raise SystemExit("the bench results and the sweep share no (alpha, beta)")
    pts = [(acc[k]["perplexity"] / exact["perplexity"] - 1, speed[k]["ratio"]) for k in keys]
    front = pareto(pts)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([100 * x for x, _ in pts], [y for _, y in pts], c="tab:blue", zorder=3)
    for (a, b), (x, y) in zip(keys, pts):
        ax.annotate(f"({a:g}, {b})", (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([100 * pts[i][0] for i in front], [pts[i][1] for i in front], "-", c="tab:orange", label="Pareto front")
    ax.scatter([0], [1.0], marker="s", c="black", label="exact routing", zorder=3)
    ax.axvline(1.0, ls=":", c="grey", label="1% perplexity bound")
    ax.set_xlabel("perplexity increase over exact routing (%)")
    ax.set_ylabel(f"decode tokens/s vs exact ({args.budget}, batch {args.batch})")
    ax.set_title(args.title or "LYNX (alpha, beta) sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)

    lines = [f"| alpha | beta | tok/s vs exact ({args.budget}, b{args.batch}) | experts/layer-step | perplexity | "
             "vs exact | top-1 agreement | Pareto |", "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    lines.append(f"| exact | | 1.00 | | {exact['perplexity']:.3f} | | 1.000 | |")
    for i, (a, b) in enumerate(keys):
        s, r = speed[a, b], acc[a, b]
        lines.append(f"| {a:g} | {b} | {s['ratio']:.2f} | {s['distinct']:.1f} | {r['perplexity']:.3f} | "
                     f"{pts[i][0]:+.2%} | {r['agreement']:.3f} | {'yes' if i in front else ''} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
