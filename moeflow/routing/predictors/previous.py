"""`previous`: each layer will use what the step's sequences used in their last step.

Shapes: L MoE layers, E experts, B sequences in the step, K top-k.
"""

from __future__ import annotations

import numpy as np

from moeflow.routing.predictors.base import Prediction, PredictorBase, RequestView, StepView
from moeflow.routing.record import StepRoutes


class PreviousPredictor(PredictorBase):
    name = "previous"

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self._last: dict[str, np.ndarray] = {}  # request id -> [L, K] its latest token's experts

    def admitted(self, request: RequestView) -> None:
        self._last.pop(request.request_id, None)

    def finished(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    def predict(self, step: StepView) -> Prediction | None:
        if step.is_prefill:
            return None
        L, E = self.num_layers, self.num_experts
        per = np.zeros((step.batch_size, L, E), dtype=np.float32)
        for b, rid in enumerate(step.request_ids):
            last = self._last.get(rid)
            if last is not None:
                np.put_along_axis(per[b], last.astype(np.int64), 1.0, axis=1)
        if not per.any():
            return None
        return Prediction(scores=per.max(axis=0), per_request=per)

    def observe(self, step: StepView, routes: StepRoutes) -> None:
        for b, rid in enumerate(step.request_ids):
            self._last[rid] = routes.ids[:, routes.rows[b].stop - 1].copy()
