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
`max_decode_wait` steps beyond that share, so time per output token stays within a fixed number of
steps of fcfs's. Each sequence has a deadline (the step by which it must decode to keep its bound);
a step first takes the sequences without which some later step would have more deadlines than it
has room for (earliest deadline first: the f soonest, f = max over h >= 0 of the deadlines within
h steps less h * M), which is every sequence at its bound and, when a cohort shares one deadline
(sequences admitted by one prefill), enough of it in the steps before.

Admission is fcfs's order, held back while the expert cache is offloaded, a full decode step runs
without the newcomers, and the prefill would take fewer than M: new requests then wait, at most
`max_admit_wait` steps past the step at which fcfs would have admitted them (default: a running
sequence's bound, so no newcomer is held longer than a running one may wait), and are prefilled
together. Offloaded, a prefill step costs nearly the same whatever it admits (its prompt tokens
route to most experts of every layer), and every running sequence waits for it. Without the hold,
sequences that route-aware decodes unevenly finish one by one, each freed row is refilled by a
prefill of its own, and served at 128 streams those prefills took back all that the route-aware
decode steps saved (docs/benchmarks/2026-12-06-h100-session14).
"""

from __future__ import annotations

import math

import numpy as np

from moeflow.engine.policies.fcfs import admit_in_order
from moeflow.engine.scheduler import RequestRows, SchedulerContext, StepPlan
from moeflow.engine.sequence import Sequence
from moeflow.routing.predictors.base import StepView
from moeflow.routing.record import StepRoutes


class RouteAwarePolicy:
    name = "route-aware"
    wants_predictions = True  # the engine fills ctx.predictions for every running sequence when it can
    reads_routes = True  # each sequence's latest routes and token: every step is settled before the next is planned

    TABLE_DECAY = 0.7  # weight of a token's older routes in the table, per new occurrence
    TABLE_SHARE = 0.8  # weight of the token table against the latest routes in a signature

    def __init__(self, max_decode_wait: int = 4, distinct_weight: float = 0.0, max_admit_wait: int | None = None):
        """max_admit_wait: the most steps a waiting request is held back to be prefilled with others (0: admitted as
        soon as fcfs would; None: the running sequences' wait bound)."""
        if max_decode_wait < 0:
            raise ValueError(f"max_decode_wait must be >= 0, got {max_decode_wait}")
        if max_admit_wait is not None and max_admit_wait < 0:
            raise ValueError(f"max_admit_wait must be >= 0, got {max_admit_wait}")
        self.max_decode_wait = max_decode_wait
        self.max_admit_wait = max_admit_wait
        self._waiting_since: dict[str, int] = {}  # request id -> the step at which a plan first saw it waiting
        self.distinct_weight = distinct_weight  # cost of a new distinct but resident expert, vs 1 for a load
        # the per-token table: token id -> its row of `_tab` [rows, L, E], how often each expert took it, decayed
        self._row: dict[int, int] = {}
        self._tab: np.ndarray | None = None

    def wait_bound(self, num_running: int, batch: int) -> int:
        """The most steps a running sequence may sit out between two of its tokens."""
        return math.ceil(num_running / batch) - 1 + self.max_decode_wait

    def plan(self, waiting: list[Sequence], running: list[Sequence], ctx: SchedulerContext) -> StepPlan:
        plan = self.unchosen(waiting, running, ctx)
        if plan is not None:
            return plan
        M = ctx.max_batch_size
        waits = np.array([ctx.step - s.last_step - 1 for s in running])
        bound = self.wait_bound(len(running), M)
        order = np.argsort(-waits, kind="stable")  # the longest waiting first: the tie-break everywhere below
        # the steps each may still sit out, soonest deadline first; the j-th of them (0-based) shares the steps up
        # to its own deadline with at least j others, so f of them must decode now
        slack = np.maximum(bound - waits[order], 0)
        forced = int(max(0, (np.arange(1, len(order) + 1) - slack * M).max()))
        due = [int(i) for i in order[: min(forced, M)]]
        sigs = self._signatures(running, ctx)[order]  # [N, L*E] in wait order: how likely each routes to each expert
        taken = np.zeros(len(running), dtype=bool)  # in wait order
        rank = np.empty(len(running), dtype=np.int64)
        rank[order] = np.arange(len(running))
        taken[rank[due]] = True
        covered = sigs[taken].max(axis=0) if due else np.zeros(sigs.shape[1])
        resident = ctx.residency.reshape(-1).astype(np.float64) if ctx.residency is not None else None
        free = covered if resident is None else np.maximum(covered, resident)
        for _ in range(M - len(due)):
            loads = sigs @ (1.0 - free)  # how much each adds that is neither resident nor needed yet
            cost = loads if not self.distinct_weight else loads + self.distinct_weight * (sigs @ (1.0 - covered))
            # costs equal to 1e-9 are ties whatever the rounding of their sums, and argmin keeps the first of
            # equals: the longest waiting
            cost = np.round(cost, 9)
            cost[taken] = np.inf
            pick = int(np.argmin(cost))
            taken[pick] = True
            covered = np.maximum(covered, sigs[pick])
            free = np.maximum(free, sigs[pick])
        chosen = set(order[taken].tolist())
        return StepPlan(decode=[s for i, s in enumerate(running) if i in chosen])

    def unchosen(self, waiting: list[Sequence], running: list[Sequence], ctx: SchedulerContext) -> StepPlan | None:
        """This step's plan where there is nothing to choose: a prefill of fcfs's admission unless it is held back
        (holds_admission), else a decode of every running sequence when they all fit in one step; None when the
        step must choose which sequences decode."""
        admitted = admit_in_order(waiting, ctx)
        if admitted and not self.holds_admission(waiting, running, admitted, ctx):
            for s in admitted:
                self._waiting_since.pop(s.request_id, None)
            return StepPlan(admit=admitted)
        return StepPlan(decode=list(running)) if len(running) <= ctx.max_batch_size else None

    def admit_wait_bound(self, num_running: int, batch: int) -> int:
        """The most steps a waiting request is held back before it is admitted."""
        return self.wait_bound(num_running, batch) if self.max_admit_wait is None else self.max_admit_wait

    def holds_admission(self, waiting: list[Sequence], running: list[Sequence], admitted: list[Sequence],
                        ctx: SchedulerContext) -> bool:
        """Whether to decode now and prefill `admitted` (fcfs's admission) later, with more."""
        since = self._waiting_since
        if len(since) > 4 * len(waiting) + 64:  # requests aborted while waiting leave their entries behind
            ids = {s.request_id for s in waiting}
            self._waiting_since = since = {r: t for r, t in since.items() if r in ids}
        for s in waiting:
            since.setdefault(s.request_id, ctx.step)
        M = ctx.max_batch_size
        if ctx.residency is None or len(running) < M or len(admitted) >= M:
            return False  # resident (a prefill is cheap), a decode step to fill, or a full prefill already
        if len(admitted) < min(len(waiting), ctx.free_kv_rows):
            return False  # the prompt-token budget is what stops it: waiting would not make it larger
        oldest = ctx.step - since[waiting[0].request_id]
        return oldest < self.admit_wait_bound(len(running), M)

    def _signatures(self, running: list[Sequence], ctx: SchedulerContext) -> np.ndarray:
        """Each sequence's expected experts, [N, L*E] in [0, 1]; a sequence with no signature yet expects none."""
        shape = next(iter(ctx.predictions.values()), ctx.residency if self._tab is None else self._tab[0])
        routed = [s.last_routes for s in running if s.last_routes is not None]
        if shape is not None:
            L, E = shape.shape
        elif routed:
            L, E = routed[0].shape[0], int(max(r.max() for r in routed)) + 1
        else:
            return np.zeros((len(running), 1))
        got = ctx.predictions
        predicted = [i for i, s in enumerate(running) if s.request_id in got]
        if len(predicted) == len(running):  # the usual case with a predictor: its scores are every signature
            ids = [s.request_id for s in running]
            rows = got.rows(ids) if isinstance(got, RequestRows) else np.stack([got[r] for r in ids])
            return rows.reshape(len(running), L * E).astype(np.float64)
        sigs = np.zeros((len(running), L, E))
        if predicted:  # a predictor's scores replace the signature
            sigs[predicted] = np.stack([got[running[i].request_id] for i in predicted])
        guessed = [i for i, s in enumerate(running) if s.request_id not in got]  # the token table, latest routes
        routed = [i for i in guessed if running[i].last_routes is not None]
        if routed:
            routes = np.stack([running[i].last_routes for i in routed]).astype(np.int64)  # [n, L, K]
            hot = np.zeros((len(routed), L, E))
            np.put_along_axis(hot, routes, 1.0, axis=2)
            sigs[routed] = hot
        rows = np.array([self._row.get(running[i].last_token, -1) for i in guessed], dtype=np.int64)
        at = np.asarray(guessed, dtype=np.int64)[rows >= 0]
        if len(at):
            sigs[at] = self.TABLE_SHARE * self._tab[rows[rows >= 0]] + (1 - self.TABLE_SHARE) * sigs[at]
        return sigs.reshape(len(running), L * E)

    def update(self, step: StepView, routes: StepRoutes) -> None:
        """Learn each fed token's experts (prefill tokens too) into the per-token table; a token seen several
        times in one step is learned once, from the mean of its routes."""
        L, _, K = routes.ids.shape
        E = routes.used.shape[1]
        tokens = np.concatenate([np.asarray(t) for t in step.input_ids])
        ids = np.concatenate([routes.ids[:, r] for r in routes.rows], axis=1)  # [L, n, K], in input order
        unique, where, occurrences = np.unique(tokens, return_inverse=True, return_counts=True)
        rows = np.array([self._row.get(t, -1) for t in unique.tolist()])
        known = rows >= 0
        if known.any():
            self._tab[rows[known]] *= self.TABLE_DECAY
        fresh = unique[~known].tolist()
        if fresh:
            first = len(self._row)
            self._grow(first + len(fresh), L, E)  # new rows are zero
            self._row.update(zip(fresh, range(first, first + len(fresh))))
            rows[~known] = np.arange(first, first + len(fresh))
        # row = decay * row + (1 - decay) * mean, the mean over the token's occurrences of its one-hot picks (a new
        # row: the mean itself), added pick by pick: n * L * K entries, not a dense [tokens, L, E] mean
        share = np.where(known, 1.0 - self.TABLE_DECAY, 1.0) / occurrences
        flat = (rows[where][None, :, None] * L + np.arange(L)[:, None, None]) * E + ids.astype(np.int64)
        np.add.at(self._tab.reshape(-1), flat.reshape(-1),
                  np.broadcast_to(share[where][None, :, None], flat.shape).reshape(-1))

    def _grow(self, rows: int, L: int, E: int) -> None:
        """Room for `rows` tokens in the table (doubling, so that learning a new token costs O(1) on average)."""
        if self._tab is None:
            self._tab = np.zeros((max(rows, 64), L, E))
        elif rows > len(self._tab):
            grown = np.zeros((max(rows, 2 * len(self._tab)), L, E))
            grown[: len(self._tab)] = self._tab
            self._tab = grown
