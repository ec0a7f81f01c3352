"""The learned predictor's decode features for 256 running sequences at the bench model's shape (12 MoE layers x
64 experts, top-8), as a route-aware scheduler asks for every step: microseconds per call, the best of 50.

    PYTHONPATH=. .venv/bin/python docs/benchmarks/2026-12-06-cpu-session14/features_time.py

Each sequence has random last routes, a random route history and a random token; the timing is of
LearnedPredictor._features alone (the forward and what follows it are not in it). Run at 6fae845 and at its
parent, 2352966, for the figures in README.md.
"""

import time
import types

import numpy as np

from moeflow.routing.predictors.base import StepView
from moeflow.routing.predictors.learned import LearnedPredictor, _Sequence

L, E, K, N = 12, 64, 8, 256
rng = np.random.default_rng(0)
fake = types.SimpleNamespace(L=L, E=E, cfg=types.SimpleNamespace(hist_decay=0.9), _seqs={})
if hasattr(LearnedPredictor, "_history"):  # before 6fae845 the features read each history through it
    fake._history = lambda s: LearnedPredictor._history(fake, s)
for i in range(N):
    routes = np.stack([rng.choice(E, K, replace=False) for _ in range(L)]).astype(np.uint8)
    fake._seqs[str(i)] = _Sequence(int(rng.integers(1000)), routes, rng.random((L, E)), int(rng.integers(1, 300)))
view = StepView(0, False, tuple(str(i) for i in range(N)), tuple((int(x),) for x in rng.integers(1000, size=N)),
                tuple([10] * N))
best = float("inf")
for _ in range(50):
    t = time.perf_counter()
    LearnedPredictor._features(fake, view)
    best = min(best, time.perf_counter() - t)
print(f"_features, {N} sequences: {best * 1e6:.0f} us")
