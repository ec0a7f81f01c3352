"""Route-aware with the predictor's forecasts, each running sequence scored only every K steps (an experiment).

    EVERY=K PYTHONPATH=. .venv/bin/python docs/benchmarks/2026-12-06-cpu-session18/scoring_every.py CORPUS

tools/closed_loop.py's route-aware:predictor (256 requests, 128 in flight, 32 a step, 25%, the shipped predictor),
with Forecast.running_predictions scoring every running sequence only at every K-th step. At the steps between, a
sequence keeps the forecast it was last given; one that has none yet (just admitted) is scored. What this costs in
bytes is what the CPU can say; what it saves in host time needs the GPU's served run.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from moeflow.engine import forecast  # noqa: E402

K = int(os.environ["EVERY"])
score = forecast.Forecast.running_predictions
kept: dict = {}


def every_k(self, running, index):
    global kept
    if index % K == 0:
        kept = score(self, running, index)
        return kept
    missing = [s for s in running if s.request_id not in kept]
    if missing:
        kept.update(score(self, missing, index))
    return {s.request_id: kept[s.request_id] for s in running if s.request_id in kept}


forecast.Forecast.running_predictions = every_k

import closed_loop  # noqa: E402

sys.argv = ["closed_loop.py", "--data", sys.argv[1], "--policies", "route-aware:predictor", "--predictor", "auto"]
closed_loop.main()
