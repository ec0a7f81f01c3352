"""Benchmark report: results.json, results.md (summary, the results table, speed-ups), and PNG plots.

Derived here, per cell: bytes moved and Belady bytes per output token and their ratio, the exposed stall's
share of decode time, the bandwidth floors of offloaded runs and the weight-read floor of resident ones,
and for every configuration other than the baseline its ratios to the baseline of the same cell (same
budget, same batch size, same prompts) and the share of its output tokens that match the baseline's.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.bench.axes import short_predictor
from moeflow.bench.runs import RunResult
from moeflow.bench.workload import describe_line
from moeflow.markdown import table


def config_label(configuration: dict) -> str:
    if not configuration:
        return ""
    return f"{short_predictor(configuration['predictor'])}/{configuration['routing']}/{configuration['scheduling']}"


def _agreement(a: list[list[int]], b: list[list[int]]) -> float | None:
    """Mean share of each request's output that matches the other run's before the first difference."""
    if not a or len(a) != len(b):
        return None
    shares = []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        shares.append(n / max(len(x), len(y), 1))
    return sum(shares) / len(shares)


def derive(meta: dict, results: list[RunResult]) -> list[dict]:
    """Each run as a dict, with its floors, its traffic ratios and its ratios to the baseline configuration."""
    base_label = config_label(meta["configurations"][0]) if meta.get("configurations") else ""
    by_cell = {(config_label(r.configuration), r.budget, r.batch): r for r in results if r.system == "moeflow"}
    resident = {(config_label(r.configuration), r.batch): r for r in results
                if r.system == "moeflow" and r.fully_resident}
    bw, mem_bw = meta.get("pinned_h2d_bytes_per_s"), meta.get("device_memory_bytes_per_s")
    rows = []
    for r in results:
        d = r.as_dict()
        label = config_label(r.configuration)
        d["config"] = label
        if r.system == "moeflow":
            belady = r.belady_bytes_per_token
            if belady:
                d["moved_over_belady"] = r.bytes_per_token / belady
            steps = r.decode_steps
            if r.fully_resident and mem_bw and steps:
                # bytes a decode step must read: dense weights (one embedding row per token, not the table)
                # and the distinct experts the step used
                step_bytes = (meta["dense_bytes"] - meta["embedding_bytes"]) + r.hits / steps * meta["expert_bytes"]
                floor_tok_s = (r.decode_tokens / steps) / (step_bytes / mem_bw)
                d["weight_read_floor_tokens_per_s"] = floor_tok_s
                d["fraction_of_weight_read_floor"] = r.decode_tokens_per_s / floor_tok_s
            ref = resident.get((label, r.batch)) or resident.get((base_label, r.batch))
            if not r.fully_resident and bw and ref is not None:
                base = ref.decode_s
                d["floor_s"] = r.bytes_moved / bw + base
                d["measured_over_floor"] = r.decode_s / d["floor_s"]
                if r.belady_misses is not None:
                    d["belady_floor_s"] = r.belady_misses * r.expert_bytes / bw + base
                    d["measured_over_belady_floor"] = r.decode_s / d["belady_floor_s"]
            b = by_cell.get((base_label, r.budget, r.batch))
            if b is not None and label != base_label:
                d["vs_base_tokens_per_s"] = r.decode_tokens_per_s / b.decode_tokens_per_s if b.decode_s else None
                # batch j of both ran the same prompts: the ratio batch by batch says how far the pooled one varies
                d["vs_base_tokens_per_s_batches"] = [x / y if y else None for x, y in
                                                     zip(r.batch_tokens_per_s, b.batch_tokens_per_s)]
                d["vs_base_bytes_per_token"] = r.bytes_per_token / b.bytes_per_token if b.bytes_per_token else None
                d["vs_base_same_tokens"] = _agreement(r.outputs, b.outputs)
        rows.append(d)
    return rows


def _vs_base(row: dict) -> str:
    """The tok/s ratio against the baseline, and its range over the cell's batches when there are several."""
    ratio = row.get("vs_base_tokens_per_s")
    batches = [x for x in row.get("vs_base_tokens_per_s_batches") or [] if x is not None]
    if ratio is None or len(batches) < 2:
        return _fmt(ratio, ".2f")
    return f"{ratio:.2f} ({min(batches):.2f}-{max(batches):.2f})"


def speedups(rows: list[dict], accelerate_budget: str | None) -> list[dict]:
    """moeflow at 100% against transformers, and at the accelerate budget against accelerate, per batch
    (moeflow in its baseline configuration)."""
    out = []
    base = next((r["config"] for r in rows if r["system"] == "moeflow"), None)
    by = {(r["system"], r["budget"], r["batch"]): r for r in rows if r["system"] != "moeflow" or r["config"] == base}
    for r in rows:
        if r["system"] == "transformers":
            m = by.get(("moeflow", "100%", r["batch"]))
            if m:
                out.append({"comparison": f"moeflow 100% / transformers ({r['budget']})", "batch": r["batch"],
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


def _pct(v) -> str:
    return _fmt(None if v is None else 100 * v, ".1f") + ("%" if v is not None else "")


def summary_table(meta: dict, results: list[RunResult] | list[dict]) -> str:
    """decode tokens/s (and hit rate) per system, configuration and budget, one column per batch size."""
    rows = [r.as_dict() | {"config": config_label(r.configuration)} if isinstance(r, RunResult) else r
            for r in results]
    batches = sorted({r["batch"] for r in rows})
    keys = list(dict.fromkeys((r["system"], r["config"], r["budget"]) for r in rows))
    cells = {(r["system"], r["config"], r["budget"], r["batch"]): r for r in rows}
    body = []
    for key in keys:
        line = list(key)
        for b in batches:
            r = cells.get((*key, b))
            if r is None:
                line.append("")
            elif r["system"] == "moeflow":
                line.append(f"{r['decode_tokens_per_s']:,.1f} ({r['hit_rate']:.0%})")
            else:
                line.append(f"{r['decode_tokens_per_s']:,.1f}")
        body.append(line)
    title = f"decode tokens/s (expert-cache hit rate), {meta['workload']['workload']} workload"
    return title + "\n\n" + table(["system", "config", "budget", *(f"batch {b}" for b in batches)], body,
                                  right_from=3)


def markdown(meta: dict, rows: list[dict], speed: list[dict]) -> str:
    w = meta["workload"]
    loss = meta.get("model_validation_loss")
    lines = [f"# {meta['title']}", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- model: {meta['model']} ({meta['architecture']}; {meta['shape']}), {meta['dtype']}"
             + (f"; validation loss {loss:.4f}" if loss is not None else ""),
             f"- command: `{meta['command']}`",
             f"- workload: {describe_line(w)}",
             f"- timing: warm (a warm-up batch of other prompts per configuration and batch size; decode graphs "
             f"captured at set-up), decode phase only, {meta['batches_per_cell']} batches of different prompts per "
             "cell with their figures summed, the expert cache emptied in place before every offloaded batch"]
    if meta.get("engine"):
        e = meta["engine"]
        extras = "".join(f", {name}" for key, name in (("fused_ops", "fused ops"), ("gate_ahead", "gate ahead"))
                         if e.get(key))
        lines.append(f"- engine: {e['max_num_seqs']} sequences at once, at most {e['max_batch_size']} per decode step, "
                     f"{e['eviction']} eviction{extras}; batch = requests per timed batch")
        if e.get("graph_captures_total"):
            lines.append(f"- set-up: {e['graph_captures_total']} decode graphs captured over the run, in "
                         f"{e['graph_capture_s']:.1f} s; the last pool's graphs hold "
                         f"{e['graph_memory_bytes'] / 2**20:.0f} MiB and its prefill warm-up took "
                         f"{e.get('prefill_warmup_s', 0):.2f} s")
    if meta.get("workload_note"):
        lines.append(f"- **{meta['workload_note']}**")
    if len(meta.get("configurations", [])) > 1:
        lines.append(f"- configurations (predictor/routing/scheduling): "
                     f"{', '.join(config_label(c) for c in meta['configurations'])}; the first is the baseline "
                     "every other is compared with in the same cell")
    if meta.get("pinned_h2d_bytes_per_s"):
        lines += [f"- measured pinned host->device bandwidth: {meta['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s; "
                  f"device memory: {meta['device_memory_bytes_per_s'] / 1e12:.2f} TB/s",
                  f"- copy engine: expert loads through the cache moved {meta['expert_load_bytes_per_s'] / 1e9:.1f} "
                  f"GB/s, {meta['expert_load_bytes_per_s'] / meta['plain_copy_same_bytes_per_s']:.1%} of one plain "
                  f"pinned copy of the same bytes ({meta['plain_copy_same_bytes_per_s'] / 1e9:.1f} GB/s)"]
    captured = [r for r in rows if r["system"] == "moeflow" and r["graph_captures"]]
    if captured:
        lines.append("- **warning: decode graphs were captured during timed runs in "
                     + ", ".join(f"{r['config']} {r['budget']} batch {r['batch']}" for r in captured)
                     + "; those timings include captures**")
    lines += ["", summary_table(meta, rows), ""]

    compare = any("vs_base_tokens_per_s" in r for r in rows)
    remapped = any(r["remapped_picks"] for r in rows)
    header = ["system", "config", "budget", "batch", "decode tok/s", "TTFT ms", "TPOT ms", "TPOT p99 ms",
              "hit rate", "MB/tok", "Belady MB/tok", "moved/Belady", "stall s", "stall share", "experts/layer-step",
              "distinct tok/req (min)", "graphs", "peak GiB", "measured/floor", "measured/Belady floor",
              "of weight-read floor"]
    if compare:
        header += ["tok/s vs base", "MB/tok vs base", "tokens as base"]
    if remapped:
        header.append("remapped picks")
    predicted = any(r.get("predictor_s") for r in rows)
    if predicted:
        header.append("predictor share")
    scheduled = any(r.get("max_decode_wait") for r in rows) and any(r.get("schedule_s") for r in rows)
    if scheduled:
        header.append("schedule share")
    load_rate = meta.get("expert_load_bytes_per_s")  # what the cache's loads ran at (None: not measured)
    if load_rate:
        header.append("copy busy")
    waited = any(r.get("max_decode_wait") for r in rows)  # more sequences running than a step takes
    if waited:
        header.append("decode wait max (p99)")
    cells = []
    for r in rows:
        moeflow = r["system"] == "moeflow"
        dt = r["distinct_tokens_mean"]
        line = [
            r["system"], r["config"], r["budget"], r["batch"], f"{r['decode_tokens_per_s']:.1f}",
            f"{r['ttft_s'] * 1e3:.1f}", f"{r['tpot_s'] * 1e3:.2f}", f"{r.get('tpot_p99_s', 0.0) * 1e3:.2f}",
            _pct(r["hit_rate"] if moeflow else None),
            _fmt(r["bytes_per_token"] / 1e6 if moeflow else None, ".2f"),
            _fmt(r["belady_bytes_per_token"] / 1e6 if r["belady_bytes_per_token"] is not None else None, ".2f"),
            _fmt(r.get("moved_over_belady"), ".2f"),
            _fmt(r["stall_s"] if moeflow else None, ".3f"), _pct(r["stall_share"] if moeflow else None),
            _fmt(r["distinct_experts_per_layer_step"], ".1f"),
            "" if dt is None else f"{dt:.1f} ({r['distinct_tokens_min']})",
            (f"{r['graph_captures']}!" if r["graph_captures"] else "0") if moeflow else "",
            f"{r['peak_device_bytes'] / 2**30:.2f}",
            _fmt(r.get("measured_over_floor"), ".2f"), _fmt(r.get("measured_over_belady_floor"), ".2f"),
            _pct(r.get("fraction_of_weight_read_floor")),
        ]
        if compare:
            line += [_vs_base(r), _fmt(r.get("vs_base_bytes_per_token"), ".2f"), _pct(r.get("vs_base_same_tokens"))]
        if remapped:
            line.append(_pct(r["remapped_picks"] / r["picks"] if r["picks"] else None))
        if predicted:
            line.append(_pct(r.get("predictor_share") if moeflow else None))
        if scheduled:
            line.append(_pct(r.get("schedule_share") if moeflow else None))
        if load_rate:
            offloaded = moeflow and not r["fully_resident"] and r["decode_s"]
            line.append(_pct(r["bytes_moved"] / load_rate / r["decode_s"] if offloaded else None))
        if waited:
            line.append("" if r.get("max_decode_wait") is None
                        else f"{r['max_decode_wait']} ({r['max_decode_wait_p99']:.0f})")
        cells.append(line)
    lines.append(table(header, cells, right_from=3))
    if speed:
        lines += ["", table(["comparison", "batch", "moeflow tok/s", "baseline tok/s", "speed-up"],
                            [[s["comparison"], s["batch"], f"{s['moeflow']:.1f}", f"{s['baseline']:.1f}",
                              f"{s['speedup']:.1f}x"] for s in speed], right_from=1)]
    lines += ["", "Columns. MB/tok: expert bytes moved host->device (demand loads and prefetches) per decode output "
              "token. Belady MB/tok: the misses of an optimal cache of the same slots on the same expert uses, "
              "starting from what the live cache held when decoding began, per token; moved/Belady is their "
              "ratio. Stall: time the compute stream waited for expert copies. Experts/layer-step: distinct "
              "experts a decode step used per MoE layer. Distinct tok/req: distinct output tokens per request, "
              "mean (min); a decode stuck in a loop shows a small number here. Graphs: decode graphs captured "
              "during the timed batches (0 when warm). Config: predictor/routing/scheduling. Predictor share: the "
              "decode time the host spent in the predictor and the cache planner (predict, refine, observe). "
              "Decode wait: the most decode steps a request sat out in a row, the longest over the cell's "
              "requests (and the 99th percentile of the per-request figure)."]
    if scheduled:
        lines[-1] += (" Schedule share: the decode time the host spent choosing each decode step, before it ran "
                      "(with route-aware and a predictor, the forecast of every running sequence).")
    if load_rate:
        lines[-1] += (" Copy busy: the decode-phase expert bytes over the rate the cache's loads ran at (the copy "
                      "engine line above), as a share of the decode time: how much of it the copy engine worked.")
    if compare:
        lines.append("Against the baseline configuration of the same cell: tok/s and MB/tok as ratios (tok/s with, "
                     "where the cell ran more than one batch, the lowest and highest ratio of a batch against the "
                     "baseline's batch of the same prompts), and tokens as base, the mean share of each request's "
                     "output matching the baseline's before the first difference (100% for exact configurations).")
    if meta.get("pinned_h2d_bytes_per_s"):
        lines.append("Floors: an offloaded run's floor is its decode-phase expert bytes over the measured pinned "
                     "bandwidth plus the resident (100%) decode time at the same batch; the Belady floor does the "
                     "same with the Belady bytes. The weight-read floor of a resident run is the bytes each decode "
                     "step must read (dense weights and the distinct experts it used) over the measured device "
                     "memory bandwidth.")
    if any(r["system"] != "moeflow" for r in rows) and w["workload"] == "text":
        lines.append("Baselines run the same prompts (left-padded, with an attention mask) and sample with the same "
                     "temperature and top_p; their random streams are not moeflow's, so their tokens differ. Their "
                     "decode time is a full run less a one-token run of the same batch.")
    return "\n".join(lines) + "\n"


def _budget_order(rows: list[dict]) -> list[str]:
    slots = {r["budget"]: r["num_slots"] for r in rows}
    return sorted(slots, key=lambda b: slots[b])


def plots(out: Path, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moeflow = [r for r in rows if r["system"] == "moeflow"]
    budgets = _budget_order(moeflow)
    configs = list(dict.fromkeys(r["config"] for r in moeflow))
    styles = ["-", "--", "-.", (0, (5, 1))]  # dotted is for Belady

    batches = sorted({r["batch"] for r in moeflow})

    def series(ax, key, scale=1.0, only=None, style=None, suffix="", marker="o"):
        for ci, conf in enumerate(configs if only is None else [only]):
            for bi, batch in enumerate(batches):
                # a resident run moves nothing, and neither would an optimal cache
                pts = sorted((budgets.index(r["budget"]), 0.0 if r["fully_resident"] else r[key]) for r in moeflow
                             if r["batch"] == batch and r["config"] == conf
                             and (r[key] is not None or r["fully_resident"]))
                if pts:
                    label = f"batch {batch}" + (f", {conf}" if len(configs) > 1 else "") + suffix
                    ax.plot([budgets[i] for i, _ in pts], [v * scale for _, v in pts], marker=marker, color=f"C{bi}",
                            ls=style or styles[ci % len(styles)], label=label)

    made = []
    for key, label, name in (("decode_tokens_per_s", "decode tokens/s", "tokens_per_s.png"),
                             ("hit_rate", "expert-cache hit rate", "hit_rate.png"),
                             ("bytes_per_token", "expert MB moved per output token", "bytes_per_token.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if key == "bytes_per_token":
            series(ax, key, 1e-6, suffix=" (measured)")
            series(ax, "belady_bytes_per_token", 1e-6, only=configs[0], style=":", suffix=" (Belady)",
                   marker="x")
        else:
            series(ax, key)
        if key == "decode_tokens_per_s":
            ax.set_yscale("log")
            for r in rows:
                if r["system"] != "moeflow":
                    ax.axhline(r["decode_tokens_per_s"], ls="--", lw=0.8, color="grey")
                    ax.annotate(f"{r['system']} b{r['batch']}", (0, r["decode_tokens_per_s"]), fontsize=7, color="grey")
        ax.set_xlabel("expert budget (share of all expert bytes on the GPU)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)
    return made


def write_report(out: Path, meta: dict, results: list[RunResult], accelerate_budget: str | None = "25%") -> None:
    rows = derive(meta, results)
    speed = speedups(rows, accelerate_budget)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows, "speedups": speed}, indent=2))
    text = markdown(meta, rows, speed)
    (out / "results.md").write_text(text)
    (out / "summary.md").write_text(summary_table(meta, rows) + "\n")
    try:
        plots(out, rows)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'moeflow[bench]')")
    print(text)
