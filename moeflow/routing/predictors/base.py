"""The predictor interface the engine calls around every step.

`predict` runs before the step and returns, per MoE layer, a score per expert (higher =
more likely needed); the expert cache may prefetch the best-scored experts and rebalance
its per-layer quotas by them. `observe` runs after each MoE layer with the routes the
router actually chose, so a predictor can correct itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from moeflow.engine.scheduler import ScheduledBatch


class Predictor(Protocol):
    observes_routes: bool  # False: `observe` is never called (and resident decode steps can run as CUDA graphs)

    def predict(self, batch: ScheduledBatch) -> dict[int, torch.Tensor] | None:
        """Per MoE layer, expert scores [E] for the step about to run; None: no prediction."""

    def observe(self, layer: int, topk_ids: torch.Tensor) -> None:
        """The experts layer `layer` actually routed to in this step, [T, K]."""


class NoPredictor:
    """On-demand loading only: the cache learns what a step needs when the router says so."""

    observes_routes = False

    def predict(self, batch: ScheduledBatch) -> dict[int, torch.Tensor] | None:
        return None

    def observe(self, layer: int, topk_ids: torch.Tensor) -> None:
        return None
