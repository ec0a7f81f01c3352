"""Route-aware decode batching (ExpertFlow's token scheduler, inside continuous batching).

Shapes: N running sequences, M = max_batch_size, L MoE layers, E experts per layer.

When more sequences run than one decode step takes, which M decode now decides how many distinct
experts the step touches and how many of them must cross to the device. Each candidate's next route
is guessed from its signature: a predictor's per-request scores when the engine has a predictor;
else a blend of what the token it is about to feed routed to before (a per-token table the policy
learns from every step's routes: the next token is known before the step, and a token's experts
recur) and the experts its latest token ran (routing is sticky from one token to the next). The
step is filled greedily: each pick is the sequence that adds the fewest experts neither resident nor
already needed by the picks so far (then the fewest new distinct experts, then the longest wait).

Fairness: round-robin over N sequences in steps of M makes each wait ceil(N/M) - 1 steps between
tokens, and no policy can do better for all of them; this one lets a sequence wait at most
`max_decode_wait` steps beyond that share, taking every sequence that reached its bound first, so
time per output token stays within a fixed number of steps of fcfs's. Admission is fcfs's.
"""

from __future__ import annotations

import math

import numpy as np

from moeflow.engine.policies.fcfs import admit_in_order
from moeflow.engine.scheduler import SchedulerContext, StepPlan
from moeflow.engine.sequence import Sequence
from moeflow.routing.predictors.base import StepView
from moeflow.routing.record import StepRoutes


class RouteAwarePolicy:
    name = "route-aware"
    wants_predictions = True  # the engine fills ctx.predictions for every running sequence when it can

    TABLE_DECAY = 0.7  # weight of a token's older routes in the table, per new occurrence
    TABLE_SHARE = 0.8  # weight of the token table against the latest routes in a signature

    def __init__(self, max_decode_wait: int = 4, distinct_weight: float = 0.0):
        if max_decode_wait < 0:
            raise ValueError(f"max_decode_wait must be >= 0, got {max_decode_wait}")
        self.max_decode_wait = max_decode_wait
        self.distinct_weight = distinct_weight  # cost of a new distinct but resident expert, vs 1 for a load
        self._table: dict[int, np.ndarray] = {}  # token id -> [L, E]: how often each expert took it, decayed

    def wait_bound(self, num_running: int, batch: int) -> int:
        """The most steps a running sequence may sit out between two of its tokens."""
        return math.ceil(num_running / batch) - 1 + self.max_decode_wait

    def plan(self, waiting: list[Sequence], running: list[Sequence], ctx: SchedulerContext) -> StepPlan:
        admitted = admit_in_order(waiting, ctx)
        if admitted:
            return StepPlan(admit=admitted)
        M = ctx.max_batch_size
        if len(running) <= M:
            return StepPlan(decode=list(running))
        waits = np.array([ctx.step - s.last_step - 1 for s in running])
        bound = self.wait_bound(len(running), M)
        # sequences at their bound go first, the longest waiting of them if there are more than fit
        due = [int(i) for i in np.argsort(-waits, kind="stable") if waits[i] >= bound][:M]
        chosen = set(due)
        sigs = self._signatures(running, ctx)  # [N, L*E]: how likely each sequence routes to each expert
        covered = sigs[due].max(axis=0) if due else np.zeros(sigs.shape[1])
        resident = ctx.residency.reshape(-1).astype(np.float64) if ctx.residency is not None else None
        free = covered if resident is None else np.maximum(covered, resident)
        order = np.argsort(-waits, kind="stable")  # tie-break: the longest waiting first
        while len(chosen) < M:
            cand = np.array([i for i in order if i not in chosen])
            loads = sigs[cand] @ (1.0 - free)  # how much it adds that is neither resident nor needed yet
            cost = loads if not self.distinct_weight else loads + self.distinct_weight * (sigs[cand] @ (1.0 - covered))
            pick = int(cand[int(np.argmin(cost))])  # argmin keeps the first of equals: the longest waiting
            chosen.add(pick)
            covered = np.maximum(covered, sigs[pick])
            free = np.maximum(free, sigs[pick])
        return StepPlan(decode=[s for i, s in enumerate(running) if i in chosen])

    def _signatures(self, running: list[Sequence], ctx: SchedulerContext) -> np.ndarray:
        """Each sequence's expected experts, [N, L*E] in [0, 1]; a sequence with no signature yet expects none."""
        shape = next(iter(ctx.predictions.values()), next(iter(self._table.values()), ctx.residency))
        routed = [s.last_routes for s in running if s.last_routes is not None]
        if shape is not None:
            L, E = shape.shape
        elif routed:
            L, E = routed[0].shape[0], int(max(r.max() for r in routed)) + 1
        else:
            return np.zeros((len(running), 1))
        sigs = np.zeros((len(running), L, E))
        for i, s in enumerate(running):
            p = ctx.predictions.get(s.request_id)
            if p is not None:
                sigs[i] = p
                continue
            if s.last_routes is not None:
                np.put_along_axis(sigs[i], s.last_routes.astype(np.int64), 1.0, axis=1)
            known = self._table.get(s.last_token)
            if known is not None:
                sigs[i] = self.TABLE_SHARE * known + (1 - self.TABLE_SHARE) * sigs[i]
        return sigs.reshape(len(running), L * E)

    def update(self, step: StepView, routes: StepRoutes) -> None:
        """Learn each fed token's experts (prefill tokens too) into the per-token table; a token seen several
        times in one step is learned once, from the mean of its routes."""
        L, _, K = routes.ids.shape
        E = routes.used.shape[1]
        tokens = np.concatenate([np.asarray(t) for t in step.input_ids])
        ids = np.concatenate([routes.ids[:, r] for r in routes.rows], axis=1)  # [L, n, K], in input order
        hot = np.zeros((len(tokens), L, E))
        np.put_along_axis(hot, ids.transpose(1, 0, 2).astype(np.int64), 1.0, axis=2)
        unique, where = np.unique(tokens, return_inverse=True)
        mean = np.zeros((len(unique), L, E))
        np.add.at(mean, where, hot)
        mean /= np.bincount(where)[:, None, None]
        for token, seen in zip(unique.tolist(), mean):
            old = self._table.get(token)
            self._table[token] = seen if old is None else self.TABLE_DECAY * old + (1 - self.TABLE_DECAY) * seen
