"""Forecast: the predictor and the expert-cache planner around each engine step.

Before a step the predictor forecasts every MoE layer's experts for the step's sequences, and the planner turns
the forecast into cache moves (quotas, protection, prefetches). As each offloaded layer's router decides, the
layer's route refines the forecast for the layers still to come (and, with the gate ahead, the next layer's own
guess joins it), and the planner corrects course. After the step's token sync the predictor learns the routes.
A scheduling policy may also ask what every running sequence is expected to route next.

None of it changes a token: a forecast only decides which experts are on the device when a layer needs them.
The host time it takes is counted per decode step (LLMEngine.counters["predictor_s"]), and split by phase over
every decode step so far in `Forecast.phase_s`: the predictor's forecast before the step (predict), the planner's
moves from it (plan), after each router the predictor's refined forecast (refine) and the planner's correction
(correct), and after the step the predictor's learning (observe).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from moeflow.engine.scheduler import RequestRows, ScheduledBatch
from moeflow.engine.sequence import Sequence
from moeflow.experts.cache import ExpertCache
from moeflow.experts.planning import Planner, PrefetchTop
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.routing.predictors import LearnedPredictor, Prediction, Predictor, RequestView, StepView
from moeflow.routing.record import RouteRecord, StepRoutes


PHASES = ("predict", "plan", "refine", "correct", "observe")


class Forecast:
    def __init__(self, record: RouteRecord, num_moe_layers: int, ahead_gate: bool):
        """`record`: the model's route record (the gate ahead's guesses are read from it); `ahead_gate`: whether
        the model's MoE layers guess the next layer's experts."""
        self.predictor: Predictor | None = None
        self.planner: Planner = PrefetchTop()
        self.cache: ExpertCache | None = None  # the engine's expert cache, replaced with it
        self._record = record
        self._num_layers = num_moe_layers
        self._ahead_gate = ahead_gate
        self._prediction: Prediction | None = None  # this step's, None without a predictor
        self._view: StepView | None = None
        self._routed: list[list[int]] = []  # this step's distinct experts per MoE layer, as the host learns them
        self._step_phases = dict.fromkeys(PHASES, 0.0)  # this step's host time in the predictor and the planner
        self.phase_s = dict.fromkeys(PHASES, 0.0)  # the decode steps' host time by phase, summed since set-up

    def install(self, predictor: Predictor | None, planner: Planner | None = None,
                graph_buckets: tuple[int, ...] = (), rounds: int = 0, prefetch_margin: float | None = None) -> None:
        """A new predictor (None: experts load on demand) and its planner (default: ExpertFlow's predictive cache
        for a learned predictor, with rounds by value of at least `rounds` experts where rounds > 0 and, unless
        None, `prefetch_margin`; plain prefetching for the others). A predictor that can capture its forward as
        CUDA graphs does so for `graph_buckets` (none: it stays eager)."""
        capture = getattr(predictor, "capture_graphs", None)
        if capture is not None and graph_buckets:
            capture(graph_buckets)
        if planner is None:
            margin = {} if prefetch_margin is None else {"prefetch_margin": prefetch_margin}
            planner = (ExpertFlowPlanner(rounds=rounds, **margin) if isinstance(predictor, LearnedPredictor)
                       else PrefetchTop())
        self.predictor, self.planner = predictor, planner

    # -- around a step --------------------------------------------------------------------------------

    def begin(self, batch: ScheduledBatch, index: int) -> StepView | None:
        """Step `index` is about to run `batch`: what the predictor sees of it (None without a predictor)."""
        self._step_phases = dict.fromkeys(PHASES, 0.0)
        self._view = batch.view(index) if self.predictor is not None else None
        return self._view

    def admitted(self, seq: Sequence) -> None:
        """A prefill step admits `seq` (untimed: no prefill step's host time is counted)."""
        if self.predictor is not None:
            self.predictor.admitted(RequestView(seq.request_id, tuple(seq.prompt_ids), seq.hints))

    def plan(self) -> None:
        """Forecast the step begun and let the planner move the cache ahead of it."""
        self._routed = []
        if self.predictor is None:
            self._prediction = None
            return
        t = time.perf_counter()
        self._prediction = self.predictor.predict(self._view)
        t = self._spent("predict", t)
        if self._prediction is not None and not self.cache.fully_resident:
            self.planner.plan(self.cache, self._prediction)
            self._spent("plan", t)

    def layer_routed(self, layer: int, used: list[int], graph_step: bool) -> None:
        """An offloaded layer's router has spoken (the host knows its experts): refine and correct course.
        `graph_step`: the step runs as a CUDA graph (the gate ahead's guesses are published from it)."""
        if self._prediction is None:
            return
        t = time.perf_counter()
        li = self.cache.ordinal(layer)
        self._routed.append(used)
        refine = getattr(self.predictor, "refine", None)
        scores = None
        if refine is not None and getattr(self.planner, "uses_refined", True):
            scores = refine(self._view, li, self._routed)
        t = self._spent("refine", t)
        ahead = None
        if self._ahead_gate and li + 1 < self._num_layers and self.planner.uses_ahead:
            ahead = self._record.layer_ahead(li, published=graph_step)
        self.planner.refine(self.cache, li, used, scores, ahead=ahead)
        self._spent("correct", t)

    def observe(self, view: StepView, routes: StepRoutes) -> float:
        """The step's routes, after its token sync: the predictor learns them. Returns the step's host time in
        the predictor and the planner (0 without a predictor)."""
        if self.predictor is None:
            return 0.0
        t = time.perf_counter()
        self.predictor.observe(view, routes)
        self._spent("observe", t)
        if not view.is_prefill:
            for phase, secs in self._step_phases.items():
                self.phase_s[phase] += secs
        return sum(self._step_phases.values())

    def _spent(self, phase: str, since: float) -> float:
        """Count the host time from `since` to now to this step's `phase`; returns now."""
        now = time.perf_counter()
        self._step_phases[phase] += now - since
        return now

    def finished(self, request_id: str) -> None:
        if self.predictor is not None:
            self.predictor.finished(request_id)

    # -- for the scheduler ----------------------------------------------------------------------------

    def running_predictions(self, running: list[Sequence], index: int) -> Mapping[str, np.ndarray]:
        """What each running sequence is expected to route next, [L, E] per request id, as if they all decoded
        at step `index` (predict looks, it does not learn: observe does); empty without per-request scores."""
        if self.predictor is None:
            return {}
        view = StepView(index, False, tuple(s.request_id for s in running), tuple((s.last_token,) for s in running),
                        tuple(s.num_tokens for s in running))
        per_request = getattr(self.predictor, "per_request", None)  # the rows alone, where a predictor offers them
        if per_request is not None:
            rows = per_request(view)
        else:
            guess = self.predictor.predict(view)
            rows = None if guess is None else guess.per_request
        if rows is None:
            return {}
        return RequestRows([s.request_id for s in running], rows)
