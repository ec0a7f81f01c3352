"""What the cache keeps up to date so as not to recompute it, and the planner's shortcuts, against their plain
definitions: the idle mask, the device table's image and the unprotected mask after every call of a replay; the
top-n selection, the donor layer and the quota trim against the sort-everything forms they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.assets import default_model_dir
from moeflow.experts.cache import LIVE, ExpertCache
from moeflow.experts.policies import make_policy
from moeflow.experts.predictive import ExpertFlowPlanner, _best, _trim
from moeflow.experts.quotas import donor_layer
from moeflow.experts.replay import FakeStore, decode_steps, replay
from moeflow.weights.checkpoint import Checkpoint

from test_planner_host_decisions import ScriptedPredictor, synthetic_routes


class CheckedCache(ExpertCache):
    """Checks its kept masks against their definitions after every call that changes slots."""

    checks = 0

    def check(self) -> None:
        resident = self.slot_of >= 0
        slot = np.maximum(self.slot_of, 0)
        assert (self._idle == (resident & (self._pins[slot] == 0))).all()
        assert (self._live == np.where(resident & (self._state[slot] == LIVE), self.slot_of, -1)).all()
        assert (self.order.unprotected == ~self.order.protected).all()
        self.checks += 1

    def acquire(self, layer, experts):
        got = super().acquire(layer, experts)
        self.check()
        return got

    def release(self, slots, spent=False):
        super().release(slots, spent)
        self.check()

    def enqueue_prefetch(self, layer, experts, deadline=0, scores=None):
        n = super().enqueue_prefetch(layer, experts, deadline, scores)
        self.check()
        return n

    def drop_prefetches(self, layer=None, experts=None):
        n = super().drop_prefetches(layer, experts)
        self.check()
        return n

    def issue_prefetches(self, limit=None):
        n = super().issue_prefetches(limit)
        self.check()
        return n


@pytest.mark.parametrize("slots,batch,rounds", [(12, 1, 0), (25, 4, 0), (64, 1, 0), (25, 4, 1), (64, 8, 1)])
def test_kept_masks_match_their_definitions_through_a_replay(slots, batch, rounds):
    spec = Checkpoint(default_model_dir()).spec
    L, E, K = spec.num_moe_layers, spec.num_experts, spec.router.top_k
    token_ids, routes, sequences = synthetic_routes([30, 21, 44, 17], L, E, K)
    steps = decode_steps(token_ids, routes, sequences, batch, E)
    cache = CheckedCache(FakeStore(spec, 1000), slots, torch.device("cpu"), make_policy("lru", L, E))
    replay(steps, cache, ScriptedPredictor(steps), ExpertFlowPlanner(rounds=rounds))
    assert cache.checks > len(steps) * L


def test_best_picks_what_a_stable_sort_picks():
    rng = np.random.default_rng(0)
    for trial in range(3000):
        L, E = int(rng.integers(1, 5)), int(rng.integers(1, 40))
        levels = int(rng.integers(1, 8))
        v = np.floor(rng.random((L, E)) * levels) / levels  # few distinct values: ties at the n-th are common
        if trial % 7 == 0:
            v[rng.random((L, E)) < 0.1] = np.nan
        n = int(rng.integers(1, L * E + 2))
        want = np.argsort(-v, axis=None, kind="stable")[:n]
        assert (np.sort(_best(v, n)) == np.sort(want)).all()


def donor_by_sorting(li: int, over: list[int], can: list[bool]) -> int | None:
    """The donor as the cache chose it before keeping excesses across takes: every layer sorted by excess."""
    by_excess = sorted(range(len(over)), key=lambda j: -over[j])
    preferred = [li] if over[li] >= 0 else [j for j in by_excess if over[j] > 0] + [li]
    return next((j for j in preferred + by_excess if can[j]), None)


def test_donor_is_the_layer_the_sorted_rule_picks():
    rng = np.random.default_rng(1)
    for _ in range(5000):
        L = int(rng.integers(1, 10))
        over = rng.integers(-3, 4, size=L).tolist()
        can = (rng.random(L) < 0.6).tolist()
        li = int(rng.integers(0, L))
        assert donor_layer(li, over, can) == donor_by_sorting(li, over, can)


class QuotaCache:
    def __init__(self, L, E, S):
        self.layers, self.num_experts, self.num_slots = tuple(range(L)), E, S


def quotas_by_sorting(v: np.ndarray, k: int, S: int) -> list[int]:
    """The value-mode quotas as first written: a stable sort of everything and a trim one argmax at a time."""
    L, E = v.shape
    floor = np.full(L, min(k, S // L), dtype=np.int64)
    q = np.maximum(np.bincount(np.argsort(-v, axis=None, kind="stable")[:S] // E, minlength=L), floor)
    while q.sum() > S:
        q[np.argmax(q - floor)] -= 1
    return q.tolist()


def test_value_quotas_equal_the_sort_everything_form():
    rng = np.random.default_rng(2)
    planner = ExpertFlowPlanner()
    for _ in range(2000):
        L, E = int(rng.integers(1, 9)), int(rng.integers(2, 40))
        S = int(rng.integers(1, L * E))
        scores = np.floor(rng.random((L, E)) * 5) / 4
        v = np.floor(rng.random((L, E)) * int(rng.integers(1, 9))) / 8
        k = ExpertFlowPlanner._top_k(None, scores)
        got = planner.demand_quotas(QuotaCache(L, E, S), scores, v).tolist()
        assert got == quotas_by_sorting(v, k, S)


def test_trim_takes_what_one_at_a_time_from_the_largest_takes():
    rng = np.random.default_rng(3)
    for _ in range(5000):
        L, floor = int(rng.integers(1, 14)), int(rng.integers(0, 4))
        counts = (floor + rng.integers(0, 12, size=L)).tolist()
        excess = int(rng.integers(-2, sum(counts) - floor * L + 1))
        want, over = list(counts), [n - floor for n in counts]
        for _ in range(excess):
            j = over.index(max(over))
            over[j] -= 1
            want[j] -= 1
        assert _trim(counts, floor, excess) == want
