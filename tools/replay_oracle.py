"""How close ExpertFlow's predictive cache can get to Belady if its predictions were perfect.

    PYTHONPATH=. python3 tools/replay_oracle.py TRACE.npz [--model DIR] [--predictor PRED_DIR] [--budget 25%]
        [--batch 1] [--tokens 2000] [--by-value 0|1]

Replays the trace's decode steps through the real ExpertCache and ExpertFlowPlanner (experts/replay.py, as
`moeflow predictor eval` does) with, in turn: LRU; the trained predictor; an oracle that knows this step's routes;
one that also knows the next step's (what a perfect next-token head would give); and ones that know the next H
steps (the nearer a use, the higher its score). Each line: experts moved per token as a multiple of Belady's
optimal cache of the same slots on the same uses. It separates what a better predictor could win from what the
planner's own rules leave on the table.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import belady, decode_steps, make_cache, pool_at, replay
from moeflow.routing.predictors.base import Prediction
from moeflow.routing.predictors.learned import load_predictor
from moeflow.routing.predictors.net import find_predictor
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint


class Oracle:
    """Scores this step's experts 1 (the true routes); with horizon H > 0, next_scores give each expert the
    nearest of its uses in the next H steps, 1 for the next step down to 1/H for the H-th."""

    name = "oracle"

    def __init__(self, steps, horizon: int):
        self.steps, self.horizon = steps, horizon

    def admitted(self, request) -> None:
        pass

    def finished(self, request_id) -> None:
        pass

    def observe(self, step, routes) -> None:
        pass

    def predict(self, view) -> Prediction:
        i = view.index
        p = Prediction(scores=self.steps[i].routes.used.astype(np.float32))
        if self.horizon:
            nxt = np.zeros_like(p.scores)
            for h in range(1, self.horizon + 1):
                if i + h < len(self.steps):
                    nxt = np.maximum(nxt, self.steps[i + h].routes.used * (1 - (h - 1) / self.horizon))
            p.next_scores = nxt
        return p


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--model", default=None)
    p.add_argument("--predictor", default=None, help="default: the one inside or beside the model directory")
    p.add_argument("--budget", default="25%")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--horizons", default="1,2,4,8,16")
    p.add_argument("--by-value", type=int, choices=(0, 1), default=1,
                   help="ExpertFlowPlanner(by_value=...): 0 shares slots by count quotas, as before 2026-12-05")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = args.model or default_model_dir()
    ck = Checkpoint(model)
    spec = ck.spec
    E = spec.num_experts
    data = RouteData.from_traces([Trace.load(args.trace)])
    slices = data.first_sequences(args.tokens)
    n = sum(s.stop - s.start for s in slices)
    slots, eb = pool_at(ck, args.budget)
    steps = decode_steps(data.token_ids, data.routes, slices, args.batch, E)
    opt = belady(steps, slots, eb, spec.moe_layers).bytes_per_token
    print(f"{n} trace tokens, batch {args.batch}, {args.budget} ({slots} slots): experts moved per token x Belady "
          f"({opt / eb:.2f} experts/token)")

    def planner() -> ExpertFlowPlanner:
        return ExpertFlowPlanner(by_value=bool(args.by_value))

    def show(label, r):
        print(f"  {label:<40} {r.bytes_per_token / opt:6.3f}x   hit rate {r.hit_rate:.3f}", flush=True)

    show("LRU", replay(steps, make_cache(spec, slots, eb)))
    pred_dir = args.predictor or find_predictor(model)
    if pred_dir is not None:
        show("trained predictor", replay(steps, make_cache(spec, slots, eb), load_predictor(pred_dir, ck),
                                         planner()))
    show("oracle: this step", replay(steps, make_cache(spec, slots, eb), Oracle(steps, 0), planner()))
    for h in map(int, args.horizons.split(",")):
        show(f"oracle: this step and the next {h}", replay(steps, make_cache(spec, slots, eb), Oracle(steps, h),
                                                          planner()))


if __name__ == "__main__":
    main()
