"""ExpertFlowPlanner: each part does what it says on a toy cache (that no part changes the tokens:
test_predictive_tokens.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.assets import default_model_dir
from moeflow.experts.cache import ExpertCache
from moeflow.experts.policies import LRUPolicy
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import make_cache
from moeflow.experts.store import ExpertStore
from moeflow.weights.checkpoint import Checkpoint

from test_cache import CountingSource, toy_spec, use

L, E, K = 3, 6, 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_cache(slots: int) -> ExpertCache:
    spec = toy_spec(L, E, K)
    store = ExpertStore(CountingSource(spec), spec, torch.float32, pin=False)
    return ExpertCache(store, slots, torch.device("cpu"), LRUPolicy(L, E))


def scores_for(picks: dict[int, dict[int, float]]) -> np.ndarray:
    s = np.full((L, E), 0.01)
    for layer, experts in picks.items():
        for e, p in experts.items():
            s[layer, e] = p
    return s


def test_quotas_follow_predicted_demand_above_a_floor():
    cache = toy_cache(9)
    planner = ExpertFlowPlanner(prefetch=False, protect=False)
    scores = scores_for({0: {0: 0.9, 1: 0.9}, 1: {e: 0.9 for e in range(6)}, 2: {0: 0.9, 1: 0.9}})
    planner.plan(cache, scores)
    q = cache.order.quota.tolist()
    assert sum(q) == 9 and min(q) >= K and q[1] == max(q) and q[1] > 3
    # a budget below one top-k per layer: the floor is what fits, S // L
    small = toy_cache(4)
    planner.plan(small, scores)
    assert small.order.quota.sum() <= 4 and small.order.quota.min() >= 4 // L
    off = toy_cache(9)
    ExpertFlowPlanner(quotas=False, prefetch=False).plan(off, scores)
    assert off.order.quota.tolist() == [3, 3, 3], "quotas off: the cache's equal shares stay"


def test_eviction_protects_the_predicted_and_takes_the_least_likely_first():
    cache = toy_cache(6)
    for e in (0, 1):
        use(cache, 0, [e])
    use(cache, 1, [0, 1])
    use(cache, 2, [0, 1])
    use(cache, 0, [0])  # LRU alone would now evict expert 1 of layer 0 ... and then 0
    planner = ExpertFlowPlanner(prefetch=False, quotas=False)
    planner.plan(cache, scores_for({0: {1: 0.9, 0: 0.2}}))
    assert cache.order.protected[0, 1] and not cache.order.protected[0, 0]
    use(cache, 0, [4])  # a miss at quota: expert 0 (less likely) goes, though 1 was used longer ago
    assert cache.slot_of[0, 1] >= 0 and cache.slot_of[0, 0] == -1
    plain = toy_cache(6)
    for e in (0, 1):
        use(plain, 0, [e])
    use(plain, 1, [0, 1])
    use(plain, 2, [0, 1])
    use(plain, 0, [0])
    ExpertFlowPlanner(protect=False, prefetch=False, quotas=False).plan(plain, scores_for({0: {1: 0.9, 0: 0.2}}))
    use(plain, 0, [4])
    assert plain.slot_of[0, 1] == -1, "protection off: LRU decides"


def test_prefetches_go_out_in_layer_order_a_few_at_a_time():
    cache = toy_cache(6)
    planner = ExpertFlowPlanner(protect=False, quotas=False, lookahead=2, issue_now=1)
    planner.plan(cache, scores_for({0: {2: 0.95, 3: 0.9}, 1: {4: 0.95}, 2: {5: 0.99}}))
    t = cache.transfer
    queued = {cache.owner[s] for s in t.queued_slots()}
    assert queued == {(0, 3), (1, 4)}, "layer 2 is beyond the lookahead: queued only once layer 0 has routed"
    assert cache.stats.per_layer[0].prefetches == 1, "issue_now: one started at once, the earliest deadline"
    assert cache.slot_of[0, 2] >= 0 and not t.is_queued(int(cache.slot_of[0, 2]))
    # layer 0's router chose 2 and 1 (its loads are ordered by the time the planner hears of it)
    planner.refine(cache, 0, [1, 2], None)
    assert cache.slot_of[0, 3] == -1, "the routed layer's unused guess is dropped before it was copied"
    owners = {cache.owner[s] for s in range(6) if cache.owner[s] is not None}
    assert (2, 5) in owners, "the next layer within the lookahead is queued as layer 0 routes"
    use(cache, 1, [4])
    assert cache.stats.per_layer[1].prefetch_hits == 1 and cache.stats.per_layer[1].misses == 0
    off = toy_cache(6)
    ExpertFlowPlanner(prefetch=False).plan(off, scores_for({0: {2: 0.95}}))
    assert off.transfer.num_queued == 0 and off.stats.total().prefetches == 0


def test_cross_step_prefetch_starts_the_next_steps_first_layers_once_the_last_has_routed():
    from moeflow.routing.predictors.learned import LearnedPrediction

    this = scores_for({0: {0: 0.9}, 1: {1: 0.9}, 2: {2: 0.9}})
    nxt = scores_for({0: {4: 0.95}, 1: {5: 0.9}, 2: {3: 0.9}})
    for cross in (True, False):
        cache = toy_cache(9)
        planner = ExpertFlowPlanner(lookahead=2, cross_step=cross)
        planner.plan(cache, LearnedPrediction(this, next_scores=nxt))
        for li in range(L):
            use(cache, li, [li])
            before = cache.stats.total().prefetches
            planner.refine(cache, li, [li], None)
            if li < L - 1:
                assert cache.slot_of[0, 4] == -1, "nothing of the next step before the last layer routes"
        owners = {cache.owner[s] for s in range(9) if cache.owner[s] is not None}
        started = cache.stats.total().prefetches - before
        if cross:
            assert {(0, 4), (1, 5)} <= owners and (2, 3) not in owners, "the first `lookahead` layers, by next_scores"
            assert started == 2 and cache.transfer.num_queued == 0, "issued at once: nothing of the step is left"
        else:
            assert (0, 4) not in owners and (1, 5) not in owners and started == 0


def test_the_gate_ahead_raises_the_next_layers_guesses_and_learns_how_far_to_trust_them():
    cache = toy_cache(9)
    planner = ExpertFlowPlanner(protect=False, quotas=False, lookahead=1, issue_now=0, issue_per_layer=0)
    planner.plan(cache, scores_for({0: {0: 0.9}, 1: {1: 0.9}}))
    use(cache, 0, [0])
    ahead = np.zeros(E, dtype=np.int64)
    ahead[4] = 1  # the gate ahead names expert 4 of layer 1 for the step's one row
    planner.refine(cache, 0, [0], None, ahead=ahead)
    # 0.5 * 0.01 + 0.5 * (1 - 0.2 ** 1) = 0.405 < prefetch_at: no prefetch from one uncertain guess
    assert planner._scores[1, 4] == pytest.approx(0.405)
    ahead[4] = 3  # the next step, three rows: 0.5 * 0.01 + 0.5 * (1 - 0.2 ** 3) = 0.501
    planner.plan(cache, scores_for({0: {0: 0.9}, 1: {1: 0.9}}))
    planner.refine(cache, 0, [0], None, ahead=ahead)
    assert planner._scores[1, 4] == pytest.approx(0.501)
    use(cache, 1, [4])
    planner.refine(cache, 1, [4], None)  # the guess came true: the layer's trust moves a tenth towards 1
    assert planner._ahead_precision[1] == pytest.approx(0.82)
    sure = ExpertFlowPlanner(protect=False, quotas=False, lookahead=2, issue_now=0, issue_per_layer=0,
                             ahead_weight=1.0)
    fresh = toy_cache(9)
    sure.plan(fresh, scores_for({0: {0: 0.9}}))
    use(fresh, 0, [0])
    sure.refine(fresh, 0, [0], None, ahead=ahead)  # weight 1: the gate alone, 0.992 for three rows
    assert (1, 4) in {fresh.owner[s] for s in fresh.transfer.queued_slots()}, "queued from the gate's guess"
    off = ExpertFlowPlanner(correct=False)
    off.plan(toy_cache(9), scores_for({}))
    off.refine(toy_cache(9), 0, [0], None, ahead=ahead)
    assert off._scores[1, 4] == pytest.approx(0.01), "correction off: the gate ahead is not heard either"


def test_correction_replans_later_layers_from_refined_scores():
    cache = toy_cache(6)
    planner = ExpertFlowPlanner(protect=False, quotas=False, lookahead=3, issue_now=0, issue_per_layer=0)
    planner.plan(cache, scores_for({0: {0: 0.9}, 1: {1: 0.9}, 2: {2: 0.9}}))
    refined = scores_for({0: {0: 1.0}, 1: {3: 0.95}, 2: {2: 0.9}})
    planner.refine(cache, 0, [0], refined)
    queued = {cache.owner[s] for s in cache.transfer.queued_slots()}
    assert (1, 3) in queued and (1, 1) not in queued, "the refined guess replaces the stale one"
    stale = toy_cache(6)
    fixed = ExpertFlowPlanner(protect=False, quotas=False, lookahead=3, issue_now=0, issue_per_layer=0,
                              correct=False)
    fixed.plan(stale, scores_for({0: {0: 0.9}, 1: {1: 0.9}, 2: {2: 0.9}}))
    fixed.refine(stale, 0, [0], refined)
    queued = {stale.owner[s] for s in stale.transfer.queued_slots()}
    assert (1, 1) in queued and (1, 3) not in queued, "correction off: the plan made before the step stands"


def test_slots_follow_value_across_layers_above_a_floor():
    """By value (the default): a miss takes the least valuable evictable expert of its own layer or of any layer
    holding more than one token's top-k, and a layer at that floor gives nothing to another layer's miss."""
    cache = toy_cache(8)
    use(cache, 0, [0, 1, 2])
    use(cache, 1, [0, 1, 2])
    use(cache, 2, [0, 1])  # the pool is full; layer 2 holds its floor, K = 2
    planner = ExpertFlowPlanner(prefetch=False)
    planner.plan(cache, scores_for({0: {e: 0.9 for e in range(4)}, 1: {0: 0.9, 1: 0.9, 2: 0.3}, 2: {0: 0.9}}))
    use(cache, 0, [3])
    assert cache.slot_of[0, 3] >= 0 and cache.slot_of[1, 2] == -1, "layer 1's unlikely expert gave its slot"
    assert cache.slot_of[2, 1] >= 0, "not layer 2's, less likely still: layer 2 holds no more than its floor"
    assert (cache.slot_of[0, :3] >= 0).all() and (cache.slot_of[1, :2] >= 0).all()
    use(cache, 1, [3])  # nothing unprotected is left: the least recently used likely expert above a floor goes
    assert cache.slot_of[1, 3] >= 0 and cache.slot_of[0, 0] == -1
    assert (cache.slot_of[2, :2] >= 0).all(), "a layer at its floor keeps its slots"
    quota = toy_cache(8)
    for layer, experts in ((0, [0, 1, 2]), (1, [0, 1, 2]), (2, [0, 1])):
        use(quota, layer, experts)
    ExpertFlowPlanner(prefetch=False, by_value=False).plan(
        quota, scores_for({0: {e: 0.9 for e in range(4)}, 1: {0: 0.9, 1: 0.9}, 2: {0: 0.9, 1: 0.9}}))
    use(quota, 1, [3])
    assert quota.slot_of[1, 2] == -1, "by quota, a layer at its quota evicts its own"


def test_a_prefetch_takes_only_a_slot_worth_far_less_than_itself():
    def planned(low: float) -> ExpertCache:
        cache = toy_cache(6)
        for layer in range(L):
            use(cache, layer, [0, 1])  # full, every layer at its floor: only a layer's own slots can go
        ExpertFlowPlanner(lookahead=3, issue_now=0, protect_at=0.95).plan(
            cache, scores_for({0: {0: 0.9, 1: 0.9}, 1: {0: 0.9, 1: low, 4: 0.99}, 2: {0: 0.9, 1: 0.9}}))
        return cache

    kept = planned(0.3)  # 0.3 is not below a quarter of 0.99
    assert kept.slot_of[1, 4] == -1 and kept.slot_of[1, 1] >= 0
    taken = planned(0.2)
    assert taken.slot_of[1, 4] >= 0 and taken.slot_of[1, 1] == -1 and taken.transfer.num_queued == 1


def test_protection_and_priorities_take_rows_from_a_layer_on():
    cache = toy_cache(6)
    mask, prio = np.zeros((L, E), dtype=bool), np.zeros((L, E))
    mask[0, 1] = mask[2, 3] = True
    prio[0, 0], prio[2, 2] = 0.5, 0.25
    cache.order.protect(mask)
    cache.order.prioritize(prio)
    mask[0, 1] = False  # the cache holds copies: the caller's arrays are its own again
    prio[0, 0] = 0.0
    assert cache.order.protected[0, 1] and cache.order.priority[0, 0] == 0.5
    cache.order.protect(np.ones((L - 1, E), dtype=bool), first=1)
    cache.order.prioritize(np.full((L - 1, E), 0.75), first=1)
    assert cache.order.protected[0].tolist() == [False, True] + [False] * (E - 2), "rows before `first` kept"
    assert cache.order.protected[1:].all() and not cache.order.unprotected[1:].any()
    assert cache.order.unprotected[0].tolist() == [True, False] + [True] * (E - 2)
    assert cache.order.priority[0, 0] == 0.5 and (cache.order.priority[1:] == 0.75).all()
    cache.order.prioritize(None)
    with pytest.raises(ValueError, match="already set for every layer"):
        cache.order.prioritize(np.zeros((L - 1, E)), first=1)


def test_priorities_order_eviction_and_ties_fall_to_lru():
    cache = toy_cache(6)
    use(cache, 0, [0])
    use(cache, 0, [1])
    use(cache, 1, [0, 1])
    use(cache, 2, [0, 1])
    prio = np.zeros((L, E))
    prio[0, 0] = 0.5
    cache.order.prioritize(prio)
    use(cache, 0, [2])
    assert cache.slot_of[0, 0] >= 0 and cache.slot_of[0, 1] == -1, "lower priority goes, though more recent"
    cache.order.prioritize(None)
    use(cache, 0, [3])
    assert cache.slot_of[0, 0] == -1, "no priorities: LRU"


def test_rounds_by_value_refuse_nonsense_and_need_slots_shared_by_value():
    with pytest.raises(ValueError, match="rounds must be"):
        ExpertFlowPlanner(rounds=-1)
    with pytest.raises(ValueError, match="rounds must be"):
        ExpertFlowPlanner(rounds=True)
    spec = Checkpoint(default_model_dir()).spec
    cache = make_cache(spec, 12, 1)
    with pytest.raises(ValueError, match="min_round"):
        cache.order.set_after_use(np.zeros((spec.num_moe_layers, spec.num_experts)), 0)
    scores = np.full((spec.num_moe_layers, spec.num_experts), 0.1)
    ExpertFlowPlanner(rounds=2, by_value=False).plan(cache, scores)
    assert cache.order.after_use is None, "count quotas: no rounds by value"
    ExpertFlowPlanner(rounds=2).plan(cache, scores)
    assert cache.order.after_use is not None and cache.order.min_round == 2
    ExpertFlowPlanner().plan(cache, scores)
    assert cache.order.after_use is None, "a planner without rounds switches them off again"
