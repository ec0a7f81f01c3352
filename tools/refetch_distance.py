"""How soon the predictive cache loads back an expert it evicted itself: the loads beyond Belady's, by distance.

    PYTHONPATH=. python3 tools/refetch_distance.py [--trace T.npz] [--predictor PRED_DIR] [--budget 25%]
        [--batch 1] [--max-tokens 800]

Replays the trace (default: the bundled model's route trace of the corpus test split, made by `moeflow trace`,
passed with --trace) through the real ExpertCache with the learned predictor and ExpertFlow's planner
(moeflow.evaluation.predictors.replay_cache, as `predictor eval` does), and Belady's cache of the same slots.
Every load into a slot is matched with the step at which the cache last evicted that same expert, if it did:
one JSON object with the loads, Belady's misses, and the loads that bring back an expert evicted 0, 1, ..., 8
and 9 or more steps before. Loads that return an expert within a few steps of evicting it are bytes an optimal
cache would not have moved.
"""

from __future__ import annotations

import argparse
import collections
import json


def main() -> None:
    from moeflow.assets import default_model_dir
    from moeflow.evaluation.predictors import replay_cache
    from moeflow.experts.cache import ExpertCache
    from moeflow.experts.predictive import ExpertFlowPlanner
    from moeflow.routing.predictors.route_data import RouteData
    from moeflow.routing.traces import Trace
    from moeflow.weights.checkpoint import Checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="a route trace of the model (`moeflow trace`)")
    p.add_argument("--model", default=None, help="the model directory (default: the bundled moeflow-tiny)")
    p.add_argument("--predictor", default=None, help="default: the model's shipped predictor")
    p.add_argument("--budget", default="25%")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=800)
    args = p.parse_args()
    model = args.model or str(default_model_dir())
    predictor = args.predictor or f"{model}/predictor"
    checkpoint = Checkpoint(model)
    data = RouteData.from_traces([Trace.load(args.trace)])

    step, planned, evicted = [0], set(), {}
    distance: collections.Counter[int] = collections.Counter()
    loads = [0]
    plan, evict, assign = ExpertFlowPlanner.plan, ExpertCache._evict, ExpertCache._assign

    def counting_plan(self, cache, scores):  # once a step, before its layers
        step[0] += 1
        planned.add(id(cache))
        return plan(self, cache, scores)

    def noting_evict(self, slot):
        if id(self) in planned:
            layer, expert = self.owner[slot]
            evicted[layer, expert] = step[0]
        return evict(self, slot)

    def noting_assign(self, slot, layer, expert):
        if id(self) in planned:
            loads[0] += 1
            if (layer, expert) in evicted:
                distance[min(step[0] - evicted.pop((layer, expert)), 9)] += 1
        return assign(self, slot, layer, expert)

    ExpertFlowPlanner.plan, ExpertCache._evict, ExpertCache._assign = counting_plan, noting_evict, noting_assign
    try:
        rows = {r["policy"]: r for r in replay_cache(predictor, checkpoint, data, [args.budget], [args.batch],
                                                     policies=("predictive", "belady"), max_tokens=args.max_tokens)}
    finally:
        ExpertFlowPlanner.plan, ExpertCache._evict, ExpertCache._assign = plan, evict, assign
    print(json.dumps({
        "model": model, "predictor": predictor, "trace": args.trace, "budget": args.budget, "batch": args.batch,
        "tokens": rows["predictive"]["tokens"], "predictive_loads": loads[0],
        "predictive_bytes_vs_belady": round(rows["predictive"]["bytes_per_token"] / rows["belady"]["bytes_per_token"],
                                            3),
        "belady_misses": rows["belady"]["misses"], "predictive_hit_rate": round(rows["predictive"]["hit_rate"], 3),
        "belady_hit_rate": round(rows["belady"]["hit_rate"], 3),
        "reloads_by_steps_since_eviction": {("9+" if k == 9 else str(k)): v for k, v in sorted(distance.items())},
    }))


if __name__ == "__main__":
    main()
