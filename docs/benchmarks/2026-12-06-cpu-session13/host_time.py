"""The predictor and planner's host time on moeflow-tiny at 25%, batch 1, for comparing two trees on the CPU.

    PYTHONPATH=TREE python3 host_time.py            # the engine's own predictor_s and decode_s a decode step
    PYTHONPATH=TREE python3 host_time.py --profile  # cProfile of the same decode, 30 costliest by own time

Three 64-token prompts of random token ids (the first one warms up), sampled at 0.8, top-p 0.95, one at a time,
torch on one thread. Run against each tree in turn (e.g. a `git worktree` of the older commit) on an idle
machine; the figures of the thirteenth session are in README.md.
"""

import cProfile
import io
import json
import pstats
import sys

import numpy as np
import torch

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.routing.predictors import load_predictor


def main() -> None:
    torch.set_num_threads(1)
    md = default_model_dir()
    llm = LLM(str(md), device="cpu", max_model_len=512, expert_budget="25%", max_num_seqs=1)
    engine = llm.engine
    engine.set_predictor(load_predictor(md / "predictor", engine.checkpoint, engine.device))
    engine.planner = ExpertFlowPlanner()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 8000, 64).tolist() for _ in range(4)]
    params = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True)
    llm.generate([prompts[0]], params)
    before = dict(engine.counters)
    profiler = cProfile.Profile() if "--profile" in sys.argv else None
    if profiler:
        profiler.enable()
    for p in prompts[1:3] if profiler else prompts[1:]:
        llm.generate([p], params)
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
        return
    c = engine.counters
    steps = c["decode_steps"] - before["decode_steps"]
    print(json.dumps({"decode_steps": steps,
                      "predictor_ms_per_step": round(1e3 * (c["predictor_s"] - before["predictor_s"]) / steps, 3),
                      "decode_ms_per_step": round(1e3 * (c["decode_s"] - before["decode_s"]) / steps, 3)}))


if __name__ == "__main__":
    main()
