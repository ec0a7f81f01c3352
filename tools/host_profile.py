"""Where an offloaded decode step's host time goes, LRU beside the predictive cache, on the text workload.

    PYTHONPATH=. python3 tools/host_profile.py MODEL_DIR --predictor PRED_DIR --corpus CORPUS_DIR --out DIR
        [--budget 25%] [--batch-sizes 1,8] [--top 45]

For each batch size, on one engine and the same requests (the text workload: corpus test-split prompts of
64-256 tokens, temperature 0.8, top_p 0.95, a seed per request, 64 output tokens): LRU, then the learned
predictor with ExpertFlow's planner, each timed as `bench offline` times it; then the predictive run once more
under cProfile. Writes DIR/profile.json (tokens/s, MB per token, stall and predictor shares, the predictor's and
planner's host time a step by phase) and, per batch size,
DIR/cprofile-bN.txt: the host functions by own time and by cumulative time. cProfile slows Python code, not
device work, so its shares overstate the host; they say where the host time is, the timed runs say how much.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
from pathlib import Path

import torch


def main() -> None:
    from moeflow.bench import axes
    from moeflow.bench.runs import run_moeflow, text_tool_engine, text_tool_parser

    p = text_tool_parser(__doc__.split("\n\n")[0], out_type=Path)
    p.add_argument("--budget", default="25%")
    p.add_argument("--top", type=int, default=45)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llm, workload, batches, lru, pred = text_tool_engine(args)
    engine = llm.engine
    confs = {"lru": lru, "predictive": pred}
    rows = []
    for batch in batches:
        timed = [workload.requests(0, batch)]
        warm = workload.requests(batch, batch)
        row = {"budget": args.budget, "batch": batch}
        for name, conf in confs.items():
            axes.apply(conf, engine)
            was, steps_were = dict(engine.forecast.phase_s), engine.counters["decode_steps"]
            r = run_moeflow(engine, args.budget, timed, warm, configuration=conf.as_dict())
            # the predictor's and planner's host time a decode step, by phase (Forecast.phase_s), over the warm-up
            # batch's decode steps and the timed ones
            steps = max(1, engine.counters["decode_steps"] - steps_were)
            row[name] = {"decode_tokens_per_s": r.decode_tokens_per_s, "mb_per_token": r.bytes_per_token / 1e6,
                         "stall_share": r.stall_share, "predictor_share": r.predictor_s / r.decode_s,
                         "decode_ms_per_step": 1e3 * r.decode_s / max(1, r.decode_steps),
                         "phase_ms_per_step": {k: round(1e3 * (v - was[k]) / steps, 4)
                                               for k, v in engine.forecast.phase_s.items()}}
        axes.apply(confs["predictive"], engine)
        prof = cProfile.Profile()
        prof.enable()
        r = run_moeflow(engine, args.budget, timed, warm, configuration=confs["predictive"].as_dict())
        prof.disable()
        row["profiled"] = {"decode_tokens_per_s": r.decode_tokens_per_s, "decode_steps": r.decode_steps,
                           "predictor_share": r.predictor_s / r.decode_s}
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        (args.out / f"cprofile-b{batch}.txt").write_text(text.getvalue())
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    (args.out / "profile.json").write_text(json.dumps({
        "model": args.model, "predictor": args.predictor, "device": device, "torch": torch.__version__,
        "workload": workload.describe(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
