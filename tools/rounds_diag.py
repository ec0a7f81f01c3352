"""Whether rounds by value (ExpertFlowPlanner(rounds=n)) leave the bundled model's tokens as the model's own.

    PYTHONPATH=. python3 tools/rounds_diag.py [cpu|cuda]

The bundled model with its shipped predictor at a 25% budget, rounds 0 and 1, decode graphs replayed and eager
(CUDA), greedy and sampled (temperature 0.8, top_p 0.95, seed 7), four short prompts each alone, 40 tokens:
each line gives the share of the output tokens that match the fully resident model's before the first
difference (1.000: the same tokens). On an H100 (2026-12-06-h100-session12) every line read 1.000, though the
trained bench model's tokens differed at 25% batch 1 with rounds in `bench offline`.
"""

import sys
import time

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.routing.predictors import load_predictor

PROMPTS = [[0, 464, 3290, 318, 262], [0, 1000, 7, 88], [0, 4000], [0, 77, 1234, 9, 10, 11, 12]]
N = 40


def run(device: str, budget: str, rounds: int, eager: bool, sampled: bool, pred: bool = True) -> list[list[int]]:
    llm = LLM(str(default_model_dir()), device=device, max_model_len=96, expert_budget=budget, enforce_eager=eager)
    engine = llm.engine
    if pred:  # the planner is set by hand: set_predictor refuses rounds on CUDA
        engine.set_predictor(load_predictor(default_model_dir() / "predictor", engine.checkpoint, engine.device))
        engine.planner = ExpertFlowPlanner(rounds=rounds)
    params = (SamplingParams(max_tokens=N, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True) if sampled
              else SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]


def agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    same = 0
    for a, b in zip(ref, got):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        same += k
    return same / sum(len(a) for a in ref)


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    t0 = time.time()
    for sampled in (True, False):
        ref = run(device, "100%", 0, False, sampled, pred=False)
        for eager in (False, True):
            for rounds in (0, 1):
                got = run(device, "25%", rounds, eager, sampled)
                print(f"sampled={int(sampled)} eager={int(eager)} budget=25% rounds={rounds} "
                      f"agree={agreement(ref, got):.3f}  t={time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
