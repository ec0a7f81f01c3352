"""The predictive cache's bytes against Belady's under other planner settings, on a trace (CPU replay).

    PYTHONPATH=. python3 tools/planner_sweep.py TRACE.npz PRED_DIR [--budget 25%] [--batch 1] [--tokens 2000]
        [--domain NAME] [--gate-ahead] [SETTINGS ...]

Each SETTINGS is a Python dict of ExpertFlowPlanner keyword arguments (e.g. "{'prefetch_at': 0.95}"; "{}" is the
default planner). The trace's first sequences up to --tokens are replayed through the real ExpertCache and planner
with the predictor (experts/replay.py, as `moeflow predictor eval` does), once per setting; each line gives experts
moved per token as a multiple of Belady's optimal cache of the same slots, the hit rate, and the rounds a layer's
experts were computed in, per layer-step (more than 1 where the pool or `rounds` splits a layer). --gate-ahead hands
the planner the trace's gate-ahead guesses, as an engine with `gate_ahead=True` would.
"""

from __future__ import annotations

import argparse
import ast

import numpy as np
import torch

from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import belady, decode_steps, make_cache, pool_at, replay
from moeflow.routing.predictors.learned import load_predictor
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("predictor")
    p.add_argument("settings", nargs="*", default=["{}"])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--budget", default="25%")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--domain", default=None, help="replay only this domain's sequences (a held-out domain, say)")
    p.add_argument("--gate-ahead", action="store_true", help="the planner hears the trace's gate-ahead guesses")
    args = p.parse_args()
    torch.set_num_threads(1)
    ck = Checkpoint(args.model)
    spec = ck.spec
    E = spec.num_experts
    slots, expert_bytes = pool_at(ck, args.budget)
    data = RouteData.from_traces([Trace.load(args.trace)])
    if args.domain is not None:
        data = data.select(np.flatnonzero(data.domains == data.domain_names.index(args.domain)))
    steps = decode_steps(data.token_ids, data.routes, data.first_sequences(args.tokens), args.batch, E, data.ahead)
    opt = belady(steps, slots, expert_bytes, spec.moe_layers).bytes_per_token
    for text in args.settings:
        kwargs = ast.literal_eval(text)
        cache = make_cache(spec, slots, expert_bytes)
        acquires = [0]
        acquire = cache.acquire

        def counted(layer, experts):  # one call per round of a layer's experts
            acquires[0] += 1
            return acquire(layer, experts)

        cache.acquire = counted
        r = replay(steps, cache, load_predictor(args.predictor, ck, "cpu"), ExpertFlowPlanner(**kwargs),
                   gate_ahead=args.gate_ahead)
        rounds = acquires[0] / (len(steps) * len(cache.layers))
        print(f"{text}: {r.bytes_per_token / opt:.3f}x Belady, hit rate {r.hit_rate:.3f}, "
              f"{rounds:.2f} rounds per layer-step", flush=True)


if __name__ == "__main__":
    main()
