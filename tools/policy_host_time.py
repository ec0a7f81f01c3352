"""Host time of the route-aware scheduling policy per step, at the bench model's shape, on this machine's CPU.

    PYTHONPATH=. python3 tools/policy_host_time.py [--running 128,256] [--steps 60]

A decode step's plan() over N running sequences (max_batch_size 32, 12 MoE layers x 64 experts, top-8, a token
table of 500 learned tokens, 16 slots a layer resident) and update() after a decode step of 32 tokens and after a
prefill step of 25 prompts x 160 tokens drawn from 8,192 token ids. Routes are random: the figure is the policy's cost, not its choice; the
picks' digest shows whether two versions of the policy chose alike.

With a learned predictor (as the engine runs route-aware with `--predictor`), a step's host time before it runs is
also the predictor's rows for every running sequence (Forecast.running_predictions: the network for the sequences
whose state moved, then every row calibrated) and plan() over them. `--predictor` times that, with a predictor of
random weights at the bench model's shape (width 2048, 8,192 token ids), the step's 32 sequences then predicted and
observed as the engine does, so that the next step has 32 fresh rows to score.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np

from moeflow.engine.policies.route_aware import RouteAwarePolicy
from moeflow.engine.scheduler import MeasuredCosts, SchedulerContext

try:
    from moeflow.engine.scheduler import RequestRows
except ImportError:  # a tree from before the rows were kept as one array: timed with the dict it built
    RequestRows = None
from moeflow.routing.predictors.base import StepView
from moeflow.routing.record import StepRoutes

L, E, K, M, VOCAB = 12, 64, 8, 32, 500
PROMPT_VOCAB = 8192  # prompts draw from the bench model's whole vocabulary: most of their tokens are new to the table


class _Seq:
    def __init__(self, i: int, routes: np.ndarray, token: int):
        self.request_id, self.last_routes, self.last_step, self.prompt_ids, self.last_token = str(i), routes, -1, [0], token


def _routes(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.argsort(rng.random((n, L, E)), axis=2)[:, :, :K]


def _learned_policy(rng: np.random.Generator) -> RouteAwarePolicy:
    policy = RouteAwarePolicy()
    tokens = tuple((t,) for t in range(VOCAB))
    ids = _routes(rng, VOCAB).transpose(1, 0, 2)  # [L, T, K]
    policy.update(StepView(0, False, tuple(map(str, range(VOCAB))), tokens, (1,) * VOCAB),
                  StepRoutes(ids, ids, np.zeros((L, E), dtype=bool), [slice(t, t + 1) for t in range(VOCAB)]))
    return policy


def time_plan(n: int, steps: int) -> tuple[float, str]:
    rng = np.random.default_rng(0)
    policy = _learned_policy(rng)
    seqs = [_Seq(i, r, int(rng.integers(0, VOCAB))) for i, r in enumerate(_routes(rng, n))]
    residency = np.zeros((L, E), dtype=bool)
    residency[:, :16] = True
    spent, digest = 0.0, hashlib.sha1()
    for step in range(steps):
        ctx = SchedulerContext(step=step, free_kv_rows=0, max_num_batched_tokens=4096, max_batch_size=M,
                               residency=residency, signatures={}, predictions={}, costs=MeasuredCosts())
        t0 = time.perf_counter()
        plan = policy.plan([], seqs, ctx)
        spent += time.perf_counter() - t0
        digest.update(",".join(s.request_id for s in plan.decode).encode())
        for s, r in zip(plan.decode, _routes(rng, len(plan.decode))):
            s.last_step, s.last_token, s.last_routes = step, int(rng.integers(0, VOCAB)), r
    return spent / steps, digest.hexdigest()[:12]


def time_predicted_plan(n: int, steps: int) -> tuple[float, float, str]:
    """(the predictor's rows for n running sequences, plan() over them), mean seconds a step, and the picks' digest."""
    import torch

    from moeflow.routing.predictors import LearnedPredictor, RequestView
    from moeflow.routing.predictors.net import NetConfig, RouteNet

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pred = LearnedPredictor(RouteNet(NetConfig(L, E, K, 2048)), torch.randn(PROMPT_VOCAB, 2048) * 0.02,
                            torch.device("cpu"))
    policy = RouteAwarePolicy()
    seqs = [_Seq(i, r, int(rng.integers(0, PROMPT_VOCAB))) for i, r in enumerate(_routes(rng, n))]
    for s in seqs:
        pred.admitted(RequestView(s.request_id, (s.last_token,)))
    residency = np.zeros((L, E), dtype=bool)
    residency[:, :16] = True
    rows_s = plan_s = 0.0
    digest = hashlib.sha1()
    for step in range(steps):
        t0 = time.perf_counter()
        view = StepView(step, False, tuple(s.request_id for s in seqs), tuple((s.last_token,) for s in seqs),
                        tuple(1 for _ in seqs))
        per = pred.per_request(view)
        ids = [s.request_id for s in seqs]
        predictions = RequestRows(ids, per) if RequestRows is not None else {r: per[i] for i, r in enumerate(ids)}
        t1 = time.perf_counter()
        ctx = SchedulerContext(step=step, free_kv_rows=0, max_num_batched_tokens=4096, max_batch_size=M,
                               residency=residency, signatures={}, predictions=predictions, costs=MeasuredCosts())
        plan = policy.plan([], seqs, ctx)
        t2 = time.perf_counter()
        rows_s, plan_s = rows_s + t1 - t0, plan_s + t2 - t1
        digest.update(",".join(s.request_id for s in plan.decode).encode())
        chosen = plan.decode
        step_view = StepView(step, False, tuple(s.request_id for s in chosen), tuple((s.last_token,) for s in chosen),
                             tuple(1 for _ in chosen))
        pred.predict(step_view)
        routed = _routes(rng, len(chosen)).transpose(1, 0, 2)  # [L, B, K]
        pred.observe(step_view, StepRoutes(routed, routed, np.zeros((L, E), dtype=bool),
                                           [slice(i, i + 1) for i in range(len(chosen))]))
        for s, r in zip(chosen, routed.transpose(1, 0, 2)):
            s.last_step, s.last_token, s.last_routes = step, int(rng.integers(0, PROMPT_VOCAB)), r
    return rows_s / steps, plan_s / steps, digest.hexdigest()[:12]


def time_update(sequences: int, tokens_each: int, reps: int) -> float:
    rng = np.random.default_rng(1)
    policy = _learned_policy(rng)
    T = sequences * tokens_each
    ids = _routes(rng, T).transpose(1, 0, 2)
    view = StepView(1, tokens_each > 1, tuple(map(str, range(sequences))),
                    tuple(tuple(int(t) for t in rng.integers(0, PROMPT_VOCAB if tokens_each > 1 else VOCAB, tokens_each))
                          for _ in range(sequences)),
                    (tokens_each,) * sequences)
    routes = StepRoutes(ids, ids, np.zeros((L, E), dtype=bool),
                        [slice(i * tokens_each, (i + 1) * tokens_each) for i in range(sequences)])
    t0 = time.perf_counter()
    for _ in range(reps):
        policy.update(view, routes)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--running", default="128,256", help="running sequences N to plan over (comma list)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--predictor", action="store_true", help="also plan from a learned predictor's rows")
    args = p.parse_args()
    for n in (int(x) for x in args.running.split(",")):
        seconds, digest = time_plan(n, args.steps)
        print(f"plan, {n} running, {M} a step: {seconds * 1e3:.2f} ms (picks {digest})")
        if args.predictor:
            rows, plan, digest = time_predicted_plan(n, args.steps)
            print(f"with a learned predictor, {n} running: its rows {rows * 1e3:.2f} ms, plan {plan * 1e3:.2f} ms, "
                  f"{(rows + plan) * 1e3:.2f} ms in all (picks {digest})")
    print(f"update after a decode step of {M} tokens: {time_update(M, 1, 50) * 1e3:.2f} ms")
    print(f"update after a prefill step of 25 x 160 tokens: {time_update(25, 160, 3) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
