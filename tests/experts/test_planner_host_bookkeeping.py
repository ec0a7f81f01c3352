"""What the cache keeps up to date so as not to recompute it, and the planner's shortcuts, against their plain
definitions: the idle mask, the device table's image and the unprotected mask after every call of a replay; the
top-n selection, the donor layer and the quota trim against the sort-everything forms they replace; the victims a
run of evictions by value takes against the masks over every layer made again for each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.assets import default_model_dir
from moeflow.experts.cache import LIVE, ExpertCache
from moeflow.experts.policies import make_policy
from moeflow.experts.predictive import ExpertFlowPlanner, _best, _trim
from moeflow.experts.quotas import ValueVictims, donor_layer, least_valuable
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


def least_valuable_by_masks(li, idle, unprotected, held, floor, priority, policy, exclude=None, below=None):
    """The victim by value as the cache chose it before keeping candidates across a run: every mask made again."""
    may_give = held > floor
    may_give[li] = held[li] > 0
    candidates = idle & may_give[:, None]
    if exclude is not None:
        candidates[li, exclude] = False
    spare = candidates & unprotected
    if np.count_nonzero(spare):
        candidates = spare
    elif below is not None:
        return None
    elif not np.count_nonzero(candidates):
        if not idle.any():
            return None
        candidates = idle
    p = np.where(candidates, priority, np.inf)
    lowest = p.min()
    if below is not None and lowest >= below:
        return None
    ties = p == lowest
    if np.count_nonzero(ties) == 1:
        return divmod(int(ties.argmax()), ties.shape[1])
    return policy.victim_anywhere(ties)


class ShownTies:
    """An eviction policy that records every mask of equals it is shown."""

    def __init__(self, policy):
        self.policy, self.shown = policy, []

    def victim_anywhere(self, candidates):
        self.shown.append(candidates.copy())
        return self.policy.victim_anywhere(candidates)


def test_value_victims_take_what_masks_made_again_take():
    rng = np.random.default_rng(4)
    later_takes = 0
    for trial in range(1500):
        L, E = int(rng.integers(1, 6)), int(rng.integers(2, 12))
        floor = int(rng.integers(0, 3))
        idle = rng.random((L, E)) < 0.6
        held = idle.sum(axis=1) + rng.integers(0, 2, size=L)  # pinned experts count too
        unprotected = rng.random((L, E)) < (0.1 if trial % 5 == 0 else 0.7)
        priority = np.floor(rng.random((L, E)) * int(rng.integers(1, 5))) / 4  # few values: many equals
        if trial % 11 == 0:
            priority[rng.random((L, E)) < 0.2] = np.inf if trial % 2 else np.nan
        policy = make_policy("lru", L, E)
        for e in rng.permutation(L * E):
            policy.touch(*divmod(int(e), E))
        li = int(rng.integers(0, L))
        exclude = rng.choice(E, size=int(rng.integers(1, 3)), replace=False).tolist() if trial % 2 else None
        victims = ValueVictims(li, idle, unprotected, held, floor, priority, ShownTies(policy), exclude)
        for take in range(int(rng.integers(1, 2 * E))):
            below = float(rng.random()) if exclude is not None else None
            want_policy = ShownTies(policy)
            want = least_valuable_by_masks(li, idle.copy(), unprotected, held.copy(), floor, priority, want_policy,
                                           exclude, below)
            assert least_valuable(li, idle.copy(), unprotected, held.copy(), floor, priority, policy, exclude,
                                  below) == want
            victims.policy.shown.clear()
            got = victims.take(below)
            assert got == want
            assert len(victims.policy.shown) == len(want_policy.shown)
            assert all((a == b).all() for a, b in zip(victims.policy.shown, want_policy.shown))
            if got is None or not idle[got]:
                break
            later_takes += take > 0
            if take % 7 != 6:  # else the pick stays where it is: the next take makes the candidates again
                idle[got] = False  # evicted, and its slot filled for li with an expert that is pinned
                held[got[0]] -= 1
                held[li] += 1
    assert later_takes > 1000
