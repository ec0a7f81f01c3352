"""When the copy engine idles during offloaded decode: LRU beside the predictive cache (and its variants), on the
text workload, from a CUDA profile of the timed batch.

    PYTHONPATH=. python3 tools/copy_timeline.py MODEL_DIR --predictor PRED_DIR --corpus CORPUS_DIR --out DIR
        [--budget 25%] [--batch-sizes 1,8] [--arms none,PRED,PRED:cross_step=1]

For each batch size, each arm (a `bench offline --predictors` value; PRED stands for --predictor) runs one warm batch, then the same
requests under torch.profiler with CUDA activity, every engine step marked. From the host-to-device copies and
the steps' windows it reports, per decode step on average: the step's time, the time some copy was running
(the copy engine's busy time), and its idle time split three ways: before the step's first copy (the step's
start: sampling, the prediction and the plan of the step before have run, nothing was queued across), after
its last copy (the last layers and the logits, with nothing left to copy), and between copies (waiting on
routers, planning, demand misses not yet known). The profiler slows the host, so its step times are longer
than `bench offline`'s; the shares say where the copy engine waits. Writes DIR/copy_timeline.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted disjoint intervals."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def step_breakdown(step: tuple[float, float], copies: list[tuple[float, float]]) -> dict[str, float]:
    """A step's window and the copies' busy intervals (disjoint, sorted): busy time inside the window and the idle
    time before the first copy, after the last and between them. With no copy, the whole step is lead idle."""
    s0, s1 = step
    inside = [(max(s, s0), min(e, s1)) for s, e in copies if e > s0 and s < s1]
    total = s1 - s0
    if not inside:
        return {"step": total, "busy": 0.0, "lead_idle": total, "tail_idle": 0.0, "inner_idle": 0.0}
    busy = sum(e - s for s, e in inside)
    lead, tail = inside[0][0] - s0, s1 - inside[-1][1]
    return {"step": total, "busy": busy, "lead_idle": lead, "tail_idle": tail, "inner_idle": total - busy - lead - tail}


def profile_arm(engine, budget: str, requests, warm) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from moeflow.bench.runs import run_moeflow
    from moeflow.config import CacheConfig, ExpertBudget

    run_moeflow(engine, budget, [requests], warm)  # warm: the pool, its graphs, the predictor's buffers
    engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
    for i, r in enumerate(requests):
        engine.add_request(f"profiled-{i}", r.prompt, r.params)
    decode = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            prefill = engine.num_waiting > 0
            with record_function("moeflow.prefill_step" if prefill else "moeflow.decode_step"):
                engine.step()
            decode += not prefill
    events = prof.events()
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "moeflow.decode_step")
    copies = union([(e.time_range.start, e.time_range.end) for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and "HtoD" in e.name])
    parts = [step_breakdown(s, copies) for s in steps]
    n = max(1, len(parts))
    mean = {k: sum(p[k] for p in parts) / n / 1e3 for k in ("step", "busy", "lead_idle", "tail_idle", "inner_idle")}
    return {"decode_steps": len(parts), **{f"{k}_ms": round(v, 3) for k, v in mean.items()},
            "busy_share": round(mean["busy"] / mean["step"], 3) if mean["step"] else 0.0}


def main() -> None:
    from moeflow.bench import axes
    from moeflow.bench.runs import text_tool_engine, text_tool_parser

    p = text_tool_parser(__doc__.split("\n\n")[0], out_type=Path, output_len=32)
    p.add_argument("--budget", default="25%")
    p.add_argument("--arms", default="none,PRED,PRED:cross_step=1")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llm, workload, batches, _, _ = text_tool_engine(args)
    engine = llm.engine
    rows = []
    for batch in batches:
        requests, warm = workload.requests(0, batch), workload.requests(batch, batch)
        for arm in args.arms.split(","):
            axes.apply(axes.listed([f"{arm.replace('PRED', args.predictor, 1)}/exact/fcfs"])[0], engine)
            row = {"batch": batch, "arm": arm, **profile_arm(engine, args.budget, requests, warm)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    (args.out / "copy_timeline.json").write_text(json.dumps(
        {"model": args.model, "predictor": args.predictor, "budget": args.budget, "device": device,
         "torch": torch.__version__, "workload": workload.describe(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
