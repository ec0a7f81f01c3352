"""The predictor interface: what the engine asks before a step and shows after it.

Shapes: L MoE layers, E experts per layer, B sequences in the step, K top-k.

A predictor sees plain views of requests and steps, never the engine. Before each step the engine
asks `predict(step)` for per-layer expert scores; the expert cache plans with them (what to prefetch,
what to protect, how many slots each layer gets). After the step, `observe(step, routes)` shows it
what every layer actually chose (read from the RouteRecord, on the host). Where an offloaded step
already waits for a router on the host, `refine(step, layer, routes_so_far)` may sharpen the scores
of the layers still to come. Predictions decide what is resident when, never which experts run: in
exact mode the tokens are the same with any predictor or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from moeflow.routing.record import StepRoutes


@dataclass(frozen=True)
class RequestHints:
    """What a request says about itself (stored for schedulers and profiles; none of it changes the tokens)."""

    task: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    priority: int = 0


@dataclass(frozen=True)
class RequestView:
    request_id: str
    prompt_ids: tuple[int, ...]
    hints: RequestHints = field(default_factory=RequestHints)


@dataclass(frozen=True)
class StepView:
    """One step as a predictor or scheduler sees it: which requests, which tokens go in."""

    index: int  # the engine's step counter
    is_prefill: bool
    request_ids: tuple[str, ...]
    input_ids: tuple[tuple[int, ...], ...]  # per request: its prompt (prefill) or its one new token (decode)
    context_lens: tuple[int, ...]  # per request: tokens in its context once this step has run

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)


@dataclass
class Prediction:
    """scores [L, E]: how much the step is expected to use each expert (higher: more likely; e.g. the
    expected number of the step's tokens routed to it). per_request [B, L, E] (optional): the same per
    sequence, for schedulers. confidence [L] in [0, 1] (optional): how far the scores can be trusted."""

    scores: np.ndarray
    per_request: np.ndarray | None = None
    confidence: np.ndarray | None = None


@runtime_checkable
class Predictor(Protocol):
    name: str

    def admitted(self, request: RequestView) -> None:
        """A request joined the running batch."""

    def finished(self, request_id: str) -> None:
        """A request left (finished or aborted)."""

    def predict(self, step: StepView) -> Prediction | None:
        """Scores for the step about to run; None: no prediction (the cache loads on demand). It only looks:
        a scheduler may ask about sequences that then do not run (learning belongs in observe)."""

    def observe(self, step: StepView, routes: StepRoutes) -> None:
        """The step's real routes."""


class RefiningPredictor(Predictor, Protocol):
    def refine(self, step: StepView, layer: int, routes_so_far: list[list[int]]) -> Prediction | None:
        """MoE layer ordinal `layer` has routed; routes_so_far[l] lists the distinct experts layer l used, for
        l <= layer. Returns scores for the whole step (the cache re-plans only layers after `layer`)."""


class PredictorBase:
    """Default no-ops for the calls a simple predictor does not need."""

    name = "base"

    def admitted(self, request: RequestView) -> None:
        return None

    def finished(self, request_id: str) -> None:
        return None

    def predict(self, step: StepView) -> Prediction | None:
        return None

    def observe(self, step: StepView, routes: StepRoutes) -> None:
        return None
