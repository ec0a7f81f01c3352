"""`frequency`: an online per-layer expert frequency, decayed so it follows what the running requests use.

Shapes: L MoE layers, E experts, T tokens in a step, B sequences in the step.

It keeps, per layer, the share of tokens that picked each expert (an exponential moving average over
steps), and scores a step of B sequences by the chance that at least one of them picks the expert,
1 - (1 - share)^B, taking tokens as independent.
"""

from __future__ import annotations

import numpy as np

from moeflow.routing.predictors.base import Prediction, PredictorBase, StepView
from moeflow.routing.record import StepRoutes


class FrequencyPredictor(PredictorBase):
    name = "frequency"

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.share = np.zeros((num_layers, num_experts), dtype=np.float64)  # per-token pick rate
        self._seen = False

    def predict(self, step: StepView) -> Prediction | None:
        if not self._seen or step.is_prefill:
            return None
        return Prediction(scores=(1.0 - (1.0 - self.share) ** step.batch_size).astype(np.float32))

    def observe(self, step: StepView, routes: StepRoutes) -> None:
        L, T, _ = routes.ids.shape
        counts = np.zeros_like(self.share)
        np.add.at(counts, (np.arange(L)[:, None, None], routes.ids.astype(np.int64)), 1.0)
        rate = np.minimum(counts / T, 1.0)
        self.share = rate if not self._seen else self.decay * self.share + (1 - self.decay) * rate
        self._seen = True
