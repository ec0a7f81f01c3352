"""The route-aware policy's vectorised step choice and token table against a plain reference of the same rule.

The reference is the rule as its docstring states it, one candidate and one token at a time; the policy computes
it over arrays. Costs within 1e-9 are ties in both (the longest waiting wins), so float rounding of the sums
cannot tell them apart.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.engine.policies.route_aware import RouteAwarePolicy
from moeflow.engine.scheduler import MeasuredCosts, SchedulerContext
from moeflow.routing.predictors.base import StepView
from moeflow.routing.record import StepRoutes


class FakeSeq:
    def __init__(self, i, routes, token):
        self.request_id, self.last_routes, self.last_step, self.prompt_ids, self.last_token = str(i), routes, -1, [0], token


class Reference:
    """The policy's rule, written plainly: per-token table as a dict, greedy picks one candidate at a time."""

    def __init__(self, policy: RouteAwarePolicy):
        self.p, self.table = policy, {}

    def signature(self, s, L, E, predictions):
        if s.request_id in predictions:
            return predictions[s.request_id].reshape(-1)
        sig = np.zeros((L, E))
        if s.last_routes is not None:
            for layer, experts in enumerate(s.last_routes):
                sig[layer, experts] = 1.0
        if s.last_token in self.table:
            sig = self.p.TABLE_SHARE * self.table[s.last_token] + (1 - self.p.TABLE_SHARE) * sig
        return sig.reshape(-1)

    def plan(self, running, ctx, L, E):
        M = ctx.max_batch_size
        if len(running) <= M:
            return [s.request_id for s in running]
        waits = [ctx.step - s.last_step - 1 for s in running]
        order = sorted(range(len(running)), key=lambda i: -waits[i])  # stable: the longest waiting first
        bound = self.p.wait_bound(len(running), M)
        # earliest deadline first: for every h >= 0, the sequences whose deadline falls within the next h steps
        # (slack <= h) fit in this step and the h after it only if this step takes count - h * M of them
        slack = [max(bound - waits[i], 0) for i in order]
        forced = max(0, max(sum(1 for s in slack if s <= h) - h * M for h in range(max(slack) + 1)))
        chosen = order[: min(forced, M)]
        sigs = [self.signature(s, L, E, ctx.predictions) for s in running]
        covered = np.max([sigs[i] for i in chosen], axis=0) if chosen else np.zeros(L * E)
        free = covered if ctx.residency is None else np.maximum(covered, ctx.residency.reshape(-1))
        while len(chosen) < M:
            best, best_cost = None, np.inf
            for i in order:
                if i in chosen:
                    continue
                cost = float(np.dot(sigs[i], 1.0 - free)) + self.p.distinct_weight * float(np.dot(sigs[i], 1.0 - covered))
                cost = round(cost, 9)
                if cost < best_cost:
                    best, best_cost = i, cost
            chosen.append(best)
            covered, free = np.maximum(covered, sigs[best]), np.maximum(free, sigs[best])
        return [running[i].request_id for i in sorted(chosen)]

    def update(self, view, routes, E):
        seen: dict[int, list[np.ndarray]] = {}
        for tokens, rows in zip(view.input_ids, routes.rows):
            for token, t in zip(tokens, range(rows.start, rows.stop)):
                hot = np.zeros((routes.ids.shape[0], E))
                for layer in range(routes.ids.shape[0]):
                    hot[layer, routes.ids[layer, t]] = 1.0
                seen.setdefault(token, []).append(hot)
        for token, hots in seen.items():
            mean = np.sum(hots, axis=0) / len(hots)
            old = self.table.get(token)
            self.table[token] = mean if old is None else self.p.TABLE_DECAY * old + (1 - self.p.TABLE_DECAY) * mean


@pytest.mark.parametrize("seed", range(12))
def test_the_policy_chooses_and_learns_as_the_plain_rule_does(seed):
    rng = np.random.default_rng(seed)
    L, E, K = int(rng.integers(1, 5)), int(rng.choice([8, 16, 32])), int(rng.integers(1, 4))
    N, M = int(rng.integers(6, 48)), int(rng.integers(1, 8))
    policy = RouteAwarePolicy(max_decode_wait=int(rng.integers(0, 3)), distinct_weight=float(rng.choice([0.0, 0.5])))
    ref = Reference(policy)
    seqs = [FakeSeq(i, None if rng.random() < 0.2 else np.stack([rng.choice(E, K, replace=False) for _ in range(L)]),
                    int(rng.integers(0, 20))) for i in range(N)]
    residency = rng.random((L, E)) < 0.3 if seed % 3 else None
    for step in range(15):
        predictions = {s.request_id: rng.random((L, E)) for s in seqs if seed % 2 and rng.random() < 0.3}
        ctx = SchedulerContext(step=step, free_kv_rows=0, max_num_batched_tokens=64, max_batch_size=M,
                               residency=residency, signatures={}, predictions=predictions, costs=MeasuredCosts())
        picked = [s.request_id for s in policy.plan([], seqs, ctx).decode]
        assert picked == ref.plan(seqs, ctx, L, E), f"step {step}"
        # the step feeds one to three tokens per chosen sequence (tokens repeat), and every one is learned
        chosen = [s for s in seqs if s.request_id in picked]
        tokens = tuple(tuple(int(t) for t in rng.integers(0, 20, int(rng.integers(1, 4)))) for _ in chosen)
        T = sum(map(len, tokens))
        ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(T)]) for _ in range(L)])
        bounds = np.cumsum([0] + [len(t) for t in tokens])
        routes = StepRoutes(ids, ids, np.zeros((L, E), dtype=bool), [slice(a, b) for a, b in zip(bounds, bounds[1:])])
        view = StepView(step, False, tuple(picked), tokens, tuple([1] * len(chosen)))
        policy.update(view, routes)
        ref.update(view, routes, E)
        for s, toks, r in zip(chosen, tokens, routes.rows):
            s.last_step, s.last_token, s.last_routes = step, toks[-1], ids[:, r.stop - 1].copy()
    learned = {t: policy._tab[row] for t, row in policy._row.items()}
    assert learned.keys() == ref.table.keys()
    for token, row in ref.table.items():
        np.testing.assert_allclose(learned[token], row, rtol=0, atol=1e-12)
