"""Planners: how a step's predicted expert scores become prefetches, quotas and protection in the cache.

Shapes: L MoE layers, E experts per layer.

A planner runs on the host before a step (`plan`) and, in offloaded decode, after each router as the
host learns the real route (`refine`, with the predictor's sharpened scores when it has any). It only
moves experts in and out; the router still decides every token's experts, so any planner leaves the
tokens exact.

`PrefetchTop` is the plain one: each layer prefetches its best-scored experts up to its quota, the
earliest layers first.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from moeflow.experts.cache import ExpertCache
from moeflow.routing.predictors.base import Prediction


class Planner(Protocol):
    name: str
    uses_refined: bool  # whether refine() reads the predictor's refined scores (if not, none are computed)

    def plan(self, cache: ExpertCache, prediction: Prediction | np.ndarray) -> None:
        """Before the step: the predictor's Prediction (or bare scores [L, E], higher = more likely used)."""

    uses_ahead: bool  # whether refine() reads the model's gate-ahead counts (if not, the host never fetches them)

    def refine(self, cache: ExpertCache, layer: int, used: list[int], prediction: Prediction | np.ndarray | None,
               ahead: np.ndarray | None = None) -> None:
        """MoE layer ordinal `layer` just routed to `used`; prediction: the predictor's refined one, if any;
        ahead [E]: the model's gate-ahead counts for layer + 1, when the engine runs with `gate_ahead`."""


def top_experts(scores: np.ndarray, n: int) -> tuple[list[int], list[float]]:
    """The n best-scored experts with a positive score, best first, and their scores."""
    if n <= 0:
        return [], []
    order = np.argsort(-scores, kind="stable")[:n]
    order = order[scores[order] > 0]
    return order.tolist(), scores[order].tolist()


class PrefetchTop:
    name = "prefetch-top"
    uses_refined = False
    uses_ahead = False

    def __init__(self, issue_now: int = 2):
        self.issue_now = issue_now  # prefetches started at once, before the first layer runs

    def plan(self, cache: ExpertCache, prediction: Prediction | np.ndarray) -> None:
        scores = prediction.scores if isinstance(prediction, Prediction) else prediction
        cache.drop_prefetches()  # the last step's unissued guesses are stale
        for li, layer in enumerate(cache.layers):
            experts, s = top_experts(scores[li], int(cache.order.quota[li]))
            cache.enqueue_prefetch(layer, experts, deadline=li, scores=s)
        cache.issue_prefetches(self.issue_now)

    def refine(self, cache: ExpertCache, layer: int, used: list[int], prediction: Prediction | np.ndarray | None,
               ahead: np.ndarray | None = None) -> None:
        return None
