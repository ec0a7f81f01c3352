"""The predictive cache's host time at the bench model's shape, with no GPU and no trained model: synthetic routes
through the real cache, planner and an untrained predictor of that shape, on the CPU.

    PYTHONPATH=. python3 tools/synthetic_replay.py [--tokens 1500] [--batch 1] [--budget 0.25] [--by-value 1]
        [--profile N]

Shapes: the bench preset's, 12 MoE layers x 64 experts, top-8, model width 2048, vocabulary 8192, 9.4 MB experts.
Routes: each token's top-8 per layer of logits made of a per-token-id part, a per-document domain part and noise,
documents of 64-200 tokens with Zipf-distributed token ids, so that routes recur the way text makes them recur.
The predictor is a RouteNet of that shape with its initial weights: its scores are near 0.5 everywhere, so the
hit rate and bytes here say how the cache behaves on an uninformative predictor, not on a trained one (see
`moeflow predictor eval` for those); the host time per step is what this measures. `--profile N` prints
cProfile's N costliest functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from types import SimpleNamespace

import numpy as np
import torch

from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import decode_steps, make_cache, replay
from moeflow.routing.predictors.learned import LearnedPredictor
from moeflow.routing.predictors.net import NetConfig, RouteNet

L, E, K, H, V = 12, 64, 8, 2048, 8192
EXPERT_BYTES = 9_437_184


def synthetic_routes(tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """Token ids [N], routes [N, L, K] and the documents' slices, N >= tokens."""
    rng = np.random.default_rng(seed)
    by_token = rng.normal(size=(V, L, E)).astype(np.float32) * 1.5
    by_domain = rng.normal(size=(6, L, E)).astype(np.float32)
    ids, routes, docs, at = [], [], [], 0
    while at < tokens:
        n, domain = int(rng.integers(64, 200)), int(rng.integers(6))
        t = rng.zipf(1.3, size=n) % V
        logits = by_token[t] + by_domain[domain] + rng.normal(size=(n, L, E)).astype(np.float32)
        routes.append(np.argsort(-logits, axis=-1)[..., :K])
        ids.append(t)
        docs.append(slice(at, at + n))
        at += n
    return np.concatenate(ids), np.concatenate(routes), docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.25, help="share of the routed experts' slots")
    p.add_argument("--by-value", type=int, choices=(0, 1), default=1, help="ExpertFlowPlanner(by_value=...)")
    p.add_argument("--profile", type=int, default=0, metavar="N")
    args = p.parse_args()
    torch.set_num_threads(1)
    ids, routes, docs = synthetic_routes(args.tokens)
    spec = SimpleNamespace(moe_layers=tuple(range(L)), num_experts=E, num_moe_layers=L,
                           router=SimpleNamespace(top_k=K))
    steps = decode_steps(ids, routes, docs, args.batch, E)
    slots = max(K, int(args.budget * L * E))
    torch.manual_seed(0)
    net, embedding = RouteNet(NetConfig(L, E, K, H)), torch.randn(V, H)

    def run(profile: cProfile.Profile | None = None) -> tuple[float, object]:
        cache = make_cache(spec, slots, EXPERT_BYTES)
        predictor = LearnedPredictor(net, embedding, torch.device("cpu"))
        planner = ExpertFlowPlanner(by_value=bool(args.by_value))
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        r = replay(steps, cache, predictor, planner)
        spent = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        return spent, r

    run()  # warm
    spent, r = run()
    print(f"{len(steps)} steps at batch {args.batch}, {slots} slots, by_value={bool(args.by_value)}: "
          f"{1e3 * spent / len(steps):.2f} ms of host time a step, hit rate {r.hit_rate:.3f}, "
          f"{r.bytes_per_token / 1e6:.1f} MB per token")
    if args.profile:
        prof = cProfile.Profile()
        run(prof)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue())


if __name__ == "__main__":
    main()
