"""Whether rounds by value (ExpertFlowPlanner(rounds=n)) leave the tokens as the model's own, and where not, the
first step and layer that differ.

    PYTHONPATH=. python3 tools/rounds_diag.py [cpu|cuda]
    PYTHONPATH=. python3 tools/rounds_diag.py cuda --model DIR --predictor PRED_DIR --data CORPUS [--budget 25%]
        [--rounds 1] [--requests 4] [--out FILE.json]

Without --model: the bundled model with its shipped predictor at a 25% budget, rounds 0 and 1, decode graphs replayed and eager
(CUDA), greedy and sampled (temperature 0.8, top_p 0.95, seed 7), four short prompts each alone, 40 tokens:
each line gives the share of the output tokens that match the fully resident model's before the first
difference (1.000: the same tokens). On an H100 (2026-12-06-h100-session12) every line read 1.000, though the
trained bench model's tokens differed at 25% batch 1 with rounds in `bench offline`.

With --model (the bench model's case): text-workload requests (corpus test split, 64-256-token prompts,
temperature 0.8, top_p 0.95, a seed each, 64 tokens), one at a time, through three engines at --budget: the
predictive cache without rounds (the reference, exact on the GPU), with rounds (decode graphs), and with rounds
eager. For each request and engine it records every step's logits (from the sampler's input) and routes (a route
listener) and reports the first step whose logits are not bit-identical to the reference's, the first step and
MoE layer whose routes differ (a layer's routes follow from the layers before it: the first layer that differs
points at the MoE output or attention just before it), and the first differing token. A JSON line per request
and engine, and with --out the lot.
"""

import argparse
import json
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
    if pred:
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


def _recorded(engine) -> dict:
    """Record every step's logits and routes on `engine` (into the returned dict, cleared by the caller)."""
    seen: dict = {"logits": [], "routes": []}
    sample = engine.sampler.sample

    def sample_and_keep(logits, *args, **kwargs):
        seen["logits"].append(logits.float().cpu().clone())
        return sample(logits, *args, **kwargs)

    engine.sampler.sample = sample_and_keep
    engine.add_route_listener(lambda step, routes: seen["routes"].append(routes.ids.copy()))
    return seen


def _first_difference(ref: dict, got: dict) -> dict:
    import torch

    out: dict = {"logits_step": None, "max_abs_diff": None, "routes_step": None, "routes_layer": None}
    for i, (a, b) in enumerate(zip(ref["logits"], got["logits"])):
        if a.shape != b.shape or not torch.equal(a, b):
            out["logits_step"] = i
            out["max_abs_diff"] = float((a - b).abs().max()) if a.shape == b.shape else None
            break
    for i, (a, b) in enumerate(zip(ref["routes"], got["routes"])):
        if a.shape != b.shape or (a != b).any():
            out["routes_step"] = i
            if a.shape == b.shape:
                out["routes_layer"] = int(next(li for li in range(a.shape[0]) if (a[li] != b[li]).any()))
            break
    return out


def bench_model(args) -> None:
    from moeflow.bench.workload import TextWorkload, load_documents

    engines = {}
    for name, rounds, eager in (("reference", 0, False), (f"rounds={args.rounds}", args.rounds, False),
                                (f"rounds={args.rounds} eager", args.rounds, True)):
        llm = LLM(args.model, device=args.device, max_num_seqs=8, expert_budget=args.budget, enforce_eager=eager)
        engine = llm.engine
        engine.set_predictor(load_predictor(args.predictor, engine.checkpoint, engine.device))
        engine.planner = ExpertFlowPlanner(rounds=rounds)
        engines[name] = (llm, _recorded(engine))
    tokenizer = next(iter(engines.values()))[0].tokenizer
    workload = TextWorkload(load_documents(args.data), tokenizer.encode, output_len=64)
    rows = []
    for i, request in enumerate(workload.requests(0, args.requests)):
        outputs = {}
        for name, (llm, seen) in engines.items():
            seen["logits"].clear()
            seen["routes"].clear()
            llm.engine.reset_expert_cache(llm.engine.config.cache)  # every engine from an empty cache
            outputs[name] = (llm.generate([request.prompt], request.params)[0].outputs[0].token_ids,
                             {k: list(v) for k, v in seen.items()})
        ref_tokens, ref_seen = outputs["reference"]
        for name, (tokens, seen) in outputs.items():
            if name == "reference":
                continue
            first_token = next((j for j, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
            row = {"request": i, "engine": name, "first_token": first_token, "steps": len(seen["logits"]),
                   **_first_difference(ref_seen, seen)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "predictor": args.predictor, "budget": args.budget,
                       "rounds": args.rounds, "device": args.device, "rows": rows}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("device", nargs="?", default="cuda")
    p.add_argument("--model", default=None)
    p.add_argument("--predictor", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--budget", default="25%")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.model:
        if not (args.predictor and args.data):
            p.error("--model needs --predictor and --data")
        bench_model(args)
        return
    device = args.device
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
