"""The learned predictor's host time in one route-aware decode step, at the bench model's shape, on the CPU.

    PYTHONPATH=TREE .venv/bin/python docs/benchmarks/2026-12-06-cpu-session18/predictor_cycle_time.py [N] [B] [stub]

N sequences run (default 128) and B of them decode each step (default 32), as `moeflow serve --max-num-seqs N
--max-batch-size B --scheduling route-aware --predictor ...` runs them. One step's predictor calls: before it, the
scheduler scores all N (`Forecast.running_predictions`: `per_request()` where the tree has it, else `predict()`); the
step predicts for the B it runs; after it, the predictor observes their routes. The network is a RouteNet of the bench shape (12 MoE layers x 64 experts, top-8, width 2048,
hidden 1024) with its initial weights, on the CPU with one thread: its forward costs far more here than on a GPU,
where it is a CUDA graph, so the `forward` column says how many rows each step's forwards ran, and `observe` is
timed on its own. With `stub`, the forward returns fixed logits at once, so the figure is the host's own
bookkeeping: what is left of the scoring where the forward is a CUDA graph. Prints the median over 40 steps, each
with fresh routes and tokens, after 5 unmeasured ones.
"""

import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from moeflow.routing.predictors.base import RequestView, StepView
from moeflow.routing.predictors.learned import LearnedPredictor
from moeflow.routing.predictors.net import NetConfig, RouteNet

L, E, K, H, V = 12, 64, 8, 2048, 8192
N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
B = int(sys.argv[2]) if len(sys.argv) > 2 else 32
torch.set_num_threads(1)
torch.manual_seed(0)
pred = LearnedPredictor(RouteNet(NetConfig(L, E, K, H, hidden=1024, horizon=2)), torch.randn(V, H),
                        torch.device("cpu"))
rows_run = []
forward = pred.logits
if len(sys.argv) > 3 and sys.argv[3] == "stub":
    fixed = np.random.default_rng(1).normal(size=(N, 2, L, E)).astype(np.float32)
    forward = lambda cur, *rest: fixed[: len(cur)].copy()  # noqa: E731
pred.logits = lambda cur, *rest: rows_run.append(len(cur)) or forward(cur, *rest)
rng = np.random.default_rng(0)
rids = [f"r{i}" for i in range(N)]
tokens = {rid: int(t) for rid, t in zip(rids, rng.integers(1, V, N))}
for rid in rids:
    pred.admitted(RequestView(rid, (0,)))


def view(index, order):
    return StepView(index, False, tuple(order), tuple((tokens[r],) for r in order), tuple([8] * len(order)))


def routes(order):
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in order]) for _ in range(L)])
    used = np.zeros((L, E), dtype=bool)
    np.put_along_axis(used, ids.reshape(L, -1), True, axis=1)
    return SimpleNamespace(router_ids=ids, rows=[slice(i, i + 1) for i in range(len(order))], used=used)


def next_tokens(order):
    for r in order:
        tokens[r] = int(rng.integers(1, V))


# the scheduler's question, as Forecast.running_predictions asks it (trees before per_request() use predict())
score = getattr(pred, "per_request", pred.predict)
pred.observe(view(0, rids), routes(rids))
next_tokens(rids)
cycle, obs, rows = [], [], []
for index in range(1, 46):
    chosen = [rids[i] for i in rng.choice(N, B, replace=False)]
    routed = routes(chosen)
    rows_run.clear()
    t0 = time.perf_counter()
    score(view(index, rids))
    pred.predict(view(index, chosen))
    t1 = time.perf_counter()
    pred.observe(view(index, chosen), routed)
    t2 = time.perf_counter()
    next_tokens(chosen)
    if index > 5:
        cycle.append(t1 - t0)
        obs.append(t2 - t1)
        rows.append(sum(rows_run))
print(f"N={N} B={B}: scoring + the step's prediction {1e3 * statistics.median(cycle):.2f} ms "
      f"(forward rows a step: {statistics.median(rows):.0f}), observe {1e3 * statistics.median(obs):.3f} ms")
