"""Route-aware's signatures as a blend of the predictor's forecast and its own guess (not kept).

    BLEND=W PYTHONPATH=. .venv/bin/python docs/benchmarks/2026-12-06-cpu-session18/signature_blend.py CORPUS

With a predictor, route-aware's signature of a running sequence is the predictor's forecast alone. This runs
tools/closed_loop.py's route-aware:predictor (256 requests, 128 in flight, 32 a step, 25%, the shipped predictor)
with each signature W * forecast + (1 - W) * the signature route-aware builds without one (its per-token table and
the sequence's last routes).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from moeflow.engine.policies import route_aware  # noqa: E402

W = float(os.environ["BLEND"])
plain = route_aware.RouteAwarePolicy._signatures


def blended(self, running, ctx):
    forecasts = ctx.predictions
    if not forecasts:
        return plain(self, running, ctx)
    ctx.predictions = {}
    own = plain(self, running, ctx)
    ctx.predictions = forecasts
    return W * plain(self, running, ctx) + (1 - W) * own


route_aware.RouteAwarePolicy._signatures = blended

import closed_loop  # noqa: E402

sys.argv = ["closed_loop.py", "--data", sys.argv[1], "--policies", "route-aware:predictor", "--predictor", "auto"]
closed_loop.main()
