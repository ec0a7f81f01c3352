"""Benchmark report: results.json, results.md (tables with floors and speed-ups), and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.bench.runs import RunResult
from moeflow.markdown import table


def derive(meta: dict, results: list[RunResult]) -> list[dict]:
    """Each run as a dict, with its floors and the ratios to them."""
    resident = {r.batch: r for r in results if r.system == "moeflow" and r.budget == "100%"}
    bw, mem_bw = meta["pinned_h2d_bytes_per_s"], meta["device_memory_bytes_per_s"]
    rows = []
    for r in results:
        d = r.as_dict()
        steps = r.output_len - 1
        if r.system == "moeflow" and r.budget == "100%":
            # bytes a decode step must read: dense weights (one embedding row per token, not the table)
            # and the distinct experts the step used
            step_bytes = (meta["dense_bytes"] - meta["embedding_bytes"]) + r.hits / steps * meta["expert_bytes"]
            floor_tok_s = r.batch / (step_bytes / mem_bw)
            d["weight_read_floor_tokens_per_s"] = floor_tok_s
            d["fraction_of_weight_read_floor"] = r.decode_tokens_per_s / floor_tok_s
        elif r.system == "moeflow" and r.batch in resident:
            base = resident[r.batch].decode_s
            floor = r.bytes_moved / bw + base
            d["floor_s"] = floor
            d["measured_over_floor"] = r.decode_s / floor
            if "belady_decode_misses" in r.extra:
                belady = r.extra["belady_decode_misses"] * meta["expert_bytes"] / bw + base
                d["belady_floor_s"] = belady
                d["measured_over_belady_floor"] = r.decode_s / belady
        rows.append(d)
    return rows


def speedups(rows: list[dict], accelerate_budget: str | None) -> list[dict]:
    """moeflow at 100% against transformers, and at the accelerate budget against accelerate, per batch."""
    out = []
    by = {(r["system"], r["budget"], r["batch"]): r for r in rows}
    for r in rows:
        if r["system"] == "transformers":
            m = by.get(("moeflow", "100%", r["batch"]))
            if m:
                out.append({"comparison": "moeflow 100% / transformers (all on GPU)", "batch": r["batch"],
                            "moeflow": m["decode_tokens_per_s"], "baseline": r["decode_tokens_per_s"],
                            "speedup": m["decode_tokens_per_s"] / r["decode_tokens_per_s"]})
        if r["system"] == "transformers+accelerate" and accelerate_budget:
            m = by.get(("moeflow", accelerate_budget, r["batch"]))
            if m:
                out.append({"comparison": f"moeflow {accelerate_budget} / transformers+accelerate ({r['budget']})",
                            "batch": r["batch"], "moeflow": m["decode_tokens_per_s"],
                            "baseline": r["decode_tokens_per_s"],
                            "speedup": m["decode_tokens_per_s"] / r["decode_tokens_per_s"]})
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict], speed: list[dict]) -> str:
    lines = [f"# {meta['title']}", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- model: {meta['model']} ({meta['architecture']}; {meta['shape']}), {meta['dtype']}",
             f"- command: `{meta['command']}`",
             f"- measured pinned host->device bandwidth: {meta['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s; "
             f"device memory: {meta['device_memory_bytes_per_s'] / 1e12:.2f} TB/s",
             f"- copy engine: expert loads through the cache moved {meta['expert_load_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"{meta['expert_load_bytes_per_s'] / meta['plain_copy_same_bytes_per_s']:.1%} of one plain pinned copy of "
             f"the same bytes ({meta['plain_copy_same_bytes_per_s'] / 1e9:.1f} GB/s)", ""]
    header = ["system", "budget", "batch", "decode tok/s", "TTFT ms", "TPOT ms", "peak GiB", "hit rate", "GB moved",
              "stall s", "measured/floor", "measured/Belady floor", "of weight-read floor"]
    cells = []
    for r in rows:
        moeflow = r["system"] == "moeflow"
        cells.append([
            r["system"], r["budget"], r["batch"], f"{r['decode_tokens_per_s']:.1f}", f"{r['ttft_s'] * 1e3:.1f}",
            f"{r['tpot_s'] * 1e3:.2f}", f"{r['peak_device_bytes'] / 2**30:.2f}",
            _fmt(r["hit_rate"] if moeflow else None, ".1%"), _fmt(r["bytes_moved"] / 1e9 if moeflow else None, ".2f"),
            _fmt(r["stall_s"] if moeflow else None, ".3f"), _fmt(r.get("measured_over_floor"), ".2f"),
            _fmt(r.get("measured_over_belady_floor"), ".2f"), _fmt(r.get("fraction_of_weight_read_floor"), ".1%"),
        ])
    lines.append(table(header, cells, right_from=2))
    if speed:
        lines += ["", table(["comparison", "batch", "moeflow tok/s", "baseline tok/s", "speed-up"],
                            [[s["comparison"], s["batch"], f"{s['moeflow']:.1f}", f"{s['baseline']:.1f}",
                              f"{s['speedup']:.1f}x"] for s in speed], right_from=1)]
    lines += ["", "Floors: an offloaded run's floor is its decode-phase expert bytes over the measured pinned bandwidth "
              "plus the resident (100%) decode time at the same batch; the Belady floor uses the misses an optimal "
              "cache of the same slots takes on the same route trace. The weight-read floor of a resident run is the "
              "bytes each decode step must read (dense weights and the distinct experts it used) over the measured "
              "device memory bandwidth."]
    return "\n".join(lines) + "\n"


def plots(out: Path, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moeflow = [r for r in rows if r["system"] == "moeflow"]
    budgets = sorted({r["budget"] for r in moeflow}, key=lambda b: float(b.rstrip("%")) if b.endswith("%") else 0)
    made = []
    for key, label, name in (("decode_tokens_per_s", "decode tokens/s", "tokens_per_s.png"),
                             ("hit_rate", "expert-cache hit rate", "hit_rate.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for batch in sorted({r["batch"] for r in moeflow}):
            pts = [(budgets.index(r["budget"]), r[key]) for r in moeflow if r["batch"] == batch]
            pts.sort()
            ax.plot([budgets[i] for i, _ in pts], [v for _, v in pts], marker="o", label=f"batch {batch}")
        if key == "decode_tokens_per_s":
            ax.set_yscale("log")
            for r in rows:
                if r["system"] != "moeflow":
                    ax.axhline(r["decode_tokens_per_s"], ls="--", lw=0.8, color="grey")
                    ax.annotate(f"{r['system']} b{r['batch']}", (0, r["decode_tokens_per_s"]), fontsize=7, color="grey")
        ax.set_xlabel("expert budget (share of all expert bytes on the GPU)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)
    return made


def write_report(out: Path, meta: dict, results: list[RunResult], accelerate_budget: str | None = "25%") -> None:
    rows = derive(meta, results)
    speed = speedups(rows, accelerate_budget)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows, "speedups": speed}, indent=2))
    (out / "results.md").write_text(markdown(meta, rows, speed))
    try:
        plots(out, rows)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'moeflow[bench]')")
    print(markdown(meta, rows, speed))
