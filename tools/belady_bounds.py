"""Two yardsticks for a cache's bytes: Belady's optimal cache seeing each expert use one by one (the bound issue
12's targets name), and Belady's rule with each layer-step's experts resident together, as the engine's one expert
kernel per layer needs them (experts/belady.py belady_grouped_misses). CPU replay of a trace.

    PYTHONPATH=. python3 tools/belady_bounds.py TRACE.npz [--model DIR] [--predictor PRED_DIR]
        [--budgets 25%,10%] [--batch-sizes 1,8] [--tokens 2000] [--json]

For each budget and batch: bytes per token of LRU and of the predictive cache (ExpertFlowPlanner with the trained
predictor) as multiples of each bound, and the grouped bound against the one-by-one bound. The one-by-one bound
may evict an expert its own layer-step used a moment ago to keep one a later layer needs; a cache that computes a
layer's experts in one kernel cannot, unless it splits the layer into rounds.
"""

from __future__ import annotations

import argparse
import json

import torch

from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import belady, decode_steps, make_cache, pool_at, replay
from moeflow.routing.predictors.learned import load_predictor
from moeflow.routing.predictors.net import find_predictor
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--model", default=None)
    p.add_argument("--predictor", default=None, help="default: the one inside or beside the model directory")
    p.add_argument("--budgets", default="25%,10%")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="one JSON object per cell instead of a table")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = args.model or default_model_dir()
    ck = Checkpoint(model)
    spec = ck.spec
    data = RouteData.from_traces([Trace.load(args.trace)])
    slices = data.first_sequences(args.tokens)
    pred_dir = args.predictor or find_predictor(model)
    if not args.json:
        print("| budget | batch | grouped / one-by-one Belady | LRU x one-by-one | LRU x grouped | predictive x "
              "one-by-one | predictive x grouped |\n|---|---:|---:|---:|---:|---:|---:|")
    for budget in args.budgets.split(","):
        slots, eb = pool_at(ck, budget)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            steps = decode_steps(data.token_ids, data.routes, slices, batch, spec.num_experts)
            one = belady(steps, slots, eb, spec.moe_layers).bytes_per_token
            together = belady(steps, slots, eb, spec.moe_layers, grouped=True).bytes_per_token
            lru = replay(steps, make_cache(spec, slots, eb)).bytes_per_token
            pred = None
            if pred_dir is not None:
                pred = replay(steps, make_cache(spec, slots, eb), load_predictor(pred_dir, ck),
                              ExpertFlowPlanner()).bytes_per_token
            cell = {"budget": budget, "batch": batch, "slots": slots, "belady_bytes_per_token": one,
                    "belady_grouped_bytes_per_token": together, "lru_bytes_per_token": lru,
                    "predictive_bytes_per_token": pred}
            if args.json:
                print(json.dumps(cell), flush=True)
                continue
            pr = (f"{pred / one:.3f}x | {pred / together:.3f}x" if pred is not None else "| ")
            print(f"| {budget} | {batch} | {together / one:.3f}x | {lru / one:.3f}x | {lru / together:.3f}x | {pr} |",
                  flush=True)


if __name__ == "__main__":
    main()
