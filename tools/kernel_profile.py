"""Where a resident decode step's GPU time goes: kernels per step, their summed time against the step's wall
time, and the kernels grouped by name (torch.profiler with CUDA activity over replayed decode graphs).

    python tools/kernel_profile.py [--batch-sizes 1,32,64] [--routing exact,lynx] [--fused-ops 0,1] [--async 0,1]
                                   [--steps 20] [--model DIR --data CORPUS] [--temperature T --top-p P]
                                   [--out DIR]

Model: random weights of the bench model's shapes (`SyntheticCheckpoint.preset("bench-12l")`: 12 layers,
64 experts, top-8, 2048 x 768, 16 query and 4 KV heads of 128), bfloat16, every expert resident. The kernels
a step runs and their sizes do not depend on trained weights; how many experts a batch touches does (random
routing touches more), so the expert kernels' share here is an upper bound of the trained model's. With
--model, a trained model instead, every expert resident, prompted with the test split of --data (its documents'
first --prompt-len tokens, the domains in turn), so that LYNX's remapping is the one real text gets.

For each engine (`--fused-ops 0,1`: without and with EngineConfig.fused_ops, one after the other in this
process), batch size and routing mode: B requests of 128-token prompts are prefilled and decoded a few warm
steps; `--steps` decode steps are timed (synchronised, no profiler), then the same number profiled. Decoding is
greedy unless --temperature says otherwise (bench offline's text workload samples at 0.8, top-p 0.95: on a trained
model greedy text repeats itself more, which LYNX's kept set can follow); each cell reports the distinct experts a
layer-step its timed steps ran.
The report (`kernel_profile.json`, `kernel_profile.md`) gives per step: wall time, GPU busy time (summed kernel
durations), kernel count, the top kernels by time with their count per step, and the device's idle time between
kernels by gap length with the longest gaps (what runs before and after them): many short gaps are launches
inside a graph, long ones the device waiting on the host. `--async` profiles each cell with steps settled one by
one (0), launched before the last is settled (1, the engine's default on CUDA), or both.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch


def _requests(engine, n: int, prompt_len: int, routing: str, start: int, prompts: list[list[int]] | None = None,
              temperature: float = 0.0, top_p: float = 1.0):
    import numpy as np

    from moeflow.sampling import SamplingParams

    rng = np.random.default_rng(start)
    for i in range(n):
        if prompts:
            ids = prompts[(start * n + i) % len(prompts)]
        else:
            ids = rng.integers(1, engine.spec.vocab_size, prompt_len).tolist()
        engine.add_request(f"r{start}-{i}", ids, SamplingParams(max_tokens=10_000, temperature=temperature,
                                                                  top_p=top_p, seed=start * n + i, ignore_eos=True,
                                                                  routing=routing))


def _decode_ready(engine, n: int) -> None:
    """Step until all n requests have left prefill (one decode step each at least)."""
    for _ in range(1000):
        engine.step()
        if engine.num_waiting == 0 and engine.num_running == n:
            engine.step()
            return
    raise RuntimeError("requests never reached decode")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel_name(name: str) -> str:
    """Group kernels whose names differ only in template arguments."""
    for cut in ("<", "("):
        if cut in name:
            name = name[: name.index(cut)]
    return name[:90]


def _text_prompts(engine, data: str, prompt_len: int) -> list[list[int]]:
    """The first prompt_len tokens of each test-split document of `data` that has as many, the domains in turn."""
    from moeflow.evaluation.documents import load_documents

    prompts = []
    for doc in load_documents([data], "test"):
        ids = engine.tokenizer.encode(doc.text)
        if len(ids) >= prompt_len:
            prompts.append(ids[:prompt_len])
    if not prompts:
        raise SystemExit(f"no test-split document of {data} has {prompt_len} tokens")
    return prompts


def idle_gaps(spans: list[tuple[float, float, str]], steps: int) -> dict:
    """Where the device idles between the profiled steps' kernels (spans: (start us, end us, name)): the idle time
    a step, split into gaps under 5 us (one kernel launching after another inside a graph), 5-50 us and over 50 us
    (the device waiting on the host or on a copy), and the five longest gaps with the kernels either side."""
    spans = sorted(spans)
    gaps = []
    end, last = None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, last, name))
        if end is None or stop > end:
            end, last = stop, name
    bins = {"under_5us": 0.0, "5_50us": 0.0, "over_50us": 0.0}
    counts = dict.fromkeys(bins, 0)
    for g, _, _ in gaps:
        key = "under_5us" if g < 5 else "5_50us" if g < 50 else "over_50us"
        bins[key] += g
        counts[key] += 1
    return {"ms_per_step": round(sum(g for g, _, _ in gaps) / steps / 1e3, 3),
            **{f"{k}_ms_per_step": round(v / steps / 1e3, 3) for k, v in bins.items()},
            **{f"{k}_per_step": round(v / steps, 1) for k, v in counts.items()},
            "longest": [{"us": round(g, 1), "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:5]]}


def profile_cell(engine, batch: int, routing: str, steps: int, prompt_len: int, seed: int,
                 prompts: list[list[int]] | None = None, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    _requests(engine, batch, prompt_len, routing, seed, prompts, temperature, top_p)
    _decode_ready(engine, batch)
    for _ in range(3):
        engine.step()
    _sync()
    before = dict(engine.counters)
    tiles = []  # each layer-step's row tiles of BM = 16 the expert kernels run: an expert with more pairs
    # than one tile holds is read by as many programs as it has tiles (one weight read each, unless L2 keeps it)

    def count_tiles(view, routes) -> None:
        for layer in routes.ids:
            tiles.append(int(np.sum(-(-np.bincount(layer[layer >= 0].ravel()) // 16))))
    remove = engine.add_route_listener(count_tiles)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync()
    wall = (time.perf_counter() - t0) / steps
    engine.step()  # settles the last timed step, if it was launched ahead, so that its experts are counted
    remove()
    layer_steps = engine.counters["layer_steps"] - before["layer_steps"]
    distinct = (engine.counters["distinct_experts"] - before["distinct_experts"]) / max(1, layer_steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        _sync()
    for rid in list(engine._seqs):
        engine.abort_request(rid)
    engine.step()
    # device-side events bar copies: the kernels and memsets (replayed graphs' too: CUPTI reports each node)
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy")]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[_kernel_name(e.name)].append(e.time_range.elapsed_us())  # a device event's own span
    busy_us = sum(sum(v) for v in by_name.values()) / steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "batch": batch, "routing": routing, "steps": steps,
        "wall_ms_per_step": round(wall * 1e3, 3),
        "gpu_busy_ms_per_step": round(busy_us / 1e3, 3),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "experts_per_layer_step": round(distinct, 1),
        "row_tiles_per_layer_step": round(float(np.mean(tiles)), 1) if tiles else None,
        "idle": idle_gaps([(e.time_range.start, e.time_range.end, _kernel_name(e.name)) for e in kernels], steps),
        "top": [{"kernel": k, "per_step": round(len(v) / steps, 1), "us_per_step": round(sum(v) / steps, 1),
                 "mean_us": round(sum(v) / len(v), 2)} for k, v in top],
    }


def main() -> None:
    from moeflow.bench.axes import load_selector_arg
    from moeflow.config import EngineConfig
    from moeflow.engine.engine import LLMEngine
    from moeflow.weights.synthetic import SyntheticCheckpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,32,64")
    p.add_argument("--routing", default="exact,lynx")
    p.add_argument("--fused-ops", default="0,1", help="engines to profile: 0 without fused ops, 1 with")
    p.add_argument("--async", dest="run_ahead", default="1",
                   help="0, 1 or 0,1: steps settled one by one, or launched before the last is settled "
                        "(EngineConfig.async_scheduling; on CUDA the default)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (bench offline's text workload samples at 0.8, top-p 0.95)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--preset", default="bench-12l")
    p.add_argument("--device", default="cuda", help="cpu runs the same steps (a smoke test: no kernels are seen)")
    p.add_argument("--model", default=None, help="a trained model directory instead of random weights")
    p.add_argument("--data", default=None, help="with --model: a corpus (its test split) the prompts come from")
    p.add_argument("--out", type=Path, default=Path("kernel_profile"))
    args = p.parse_args()
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together")
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    routings = args.routing.split(",")
    device = torch.device(args.device)
    checkpoint = None if args.model else SyntheticCheckpoint.preset(args.preset, seed=0, dtype=torch.bfloat16,
                                                                     device=device)
    cells = []
    prompts = None
    for fused in (bool(int(f)) for f in args.fused_ops.split(",")):
        config = EngineConfig(model=args.model or "<synthetic>", device=args.device, dtype="bfloat16",
                              max_model_len=args.prompt_len + 256, max_num_seqs=max(batches),
                              max_num_batched_tokens=max(4096, args.prompt_len * max(batches)), fused_ops=fused)
        if args.model:
            engine = LLMEngine(config)
            prompts = prompts or _text_prompts(engine, args.data, args.prompt_len)
        else:
            engine = LLMEngine(config, skip_tokenizer_init=True, checkpoint=checkpoint)
        engine.store.fill_all(progress=False)
        if any(r != "exact" for r in routings):
            engine.set_selector(load_selector_arg(next(r for r in routings if r != "exact"), engine))
        for b in batches:
            for r in routings:
                for run_ahead in (bool(int(a)) for a in args.run_ahead.split(",")):
                    engine.async_scheduling = run_ahead
                    cell = profile_cell(engine, b, r.split(":", 1)[0], args.steps, args.prompt_len, seed=len(cells),
                                        prompts=prompts, temperature=args.temperature, top_p=args.top_p)
                    cell["fused_ops"], cell["async"] = fused, run_ahead
                    cells.append(cell)
                    print(json.dumps({k: v for k, v in cell.items() if k != "top"}), flush=True)
        del engine
        gc.collect()  # the pool and its pinned store go before the next engine makes its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "model": args.model or f"{args.preset} (random)", "prompt_len": args.prompt_len,
            "temperature": args.temperature, "top_p": args.top_p, "cells": cells}
    (args.out / "kernel_profile.json").write_text(json.dumps(meta, indent=2))
    lines = [f"# Resident decode kernels ({meta['device']}, torch {meta['torch']}, {meta['model']})", "",
             f"Sampling: temperature {args.temperature}, top-p {args.top_p}.", "",
             "| batch | routing | fused ops | async | ms a step | GPU busy ms | kernels a step | experts a layer-step "
             "| row tiles of 16 a layer-step | step vs unfused | idle ms: gaps < 5 us / 5-50 us / > 50 us |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    unfused = {(c["batch"], c["routing"], c["async"]): c["wall_ms_per_step"] for c in cells if not c["fused_ops"]}
    for c in cells:
        base = unfused.get((c["batch"], c["routing"], c["async"]))
        ratio = f"{base / c['wall_ms_per_step']:.2f}x" if base and c["fused_ops"] else ""
        idle = c["idle"]
        lines.append(f"| {c['batch']} | {c['routing']} | {'on' if c['fused_ops'] else 'off'} "
                     f"| {'on' if c['async'] else 'off'} | {c['wall_ms_per_step']} | {c['gpu_busy_ms_per_step']} "
                     f"| {c['kernels_per_step']} | {c['experts_per_layer_step']} | {c['row_tiles_per_layer_step']} | {ratio} | {idle['ms_per_step']}: {idle['under_5us_ms_per_step']} "
                     f"({idle['under_5us_per_step']}) / {idle['5_50us_ms_per_step']} ({idle['5_50us_per_step']}) / "
                     f"{idle['over_50us_ms_per_step']} ({idle['over_50us_per_step']}) |")
    lines += ["", "Idle: the device's time between the profiled steps' kernels, a step, by gap length (count a step in "
              "brackets); under 5 us is one kernel launching after another, over 50 us the device waiting on the "
              "host.", ""]
    for c in cells:
        lines += [f"## batch {c['batch']}, {c['routing']}, fused ops {'on' if c['fused_ops'] else 'off'}, async "
                  f"{'on' if c['async'] else 'off'}: {c['wall_ms_per_step']} ms a step, GPU busy "
                  f"{c['gpu_busy_ms_per_step']} ms, {c['kernels_per_step']} kernels", "",
                  "| kernel | per step | us per step | mean us |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['kernel']}` | {t['per_step']} | {t['us_per_step']} | {t['mean_us']} |" for t in c["top"]]
        lines += ["", "Longest idle gaps: " + "; ".join(f"{g['us']} us after `{g['after']}`, before `{g['before']}`"
                                                      for g in c["idle"]["longest"]), ""]
    (args.out / "kernel_profile.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
