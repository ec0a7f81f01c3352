"""ExpertCache: slots, quotas, eviction order, pins, prefetch; run on the CPU, as CI does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.experts.cache import ExpertCache
from moeflow.experts.policies import LFUPolicy, LRUPolicy
from moeflow.experts.store import ExpertStore
from moeflow.routing.predictors import Prediction, PredictorBase
from moeflow.architectures.spec import ModelSpec, RouterSpec


class CountingSource:
    """Expert e of layer l is filled with the value 100*l + e, and every read is counted."""

    def __init__(self, spec):
        self.spec, self.reads = spec, 0

    def read_expert(self, layer, expert):
        self.reads += 1
        I, H = self.spec.expert_width, self.spec.hidden_size
        v = float(100 * layer + expert)
        return torch.full((I, H), v), torch.full((I, H), v), torch.full((H, I), v)


def toy_spec(layers=3, experts=6, top_k=2) -> ModelSpec:
    return ModelSpec(
        architecture="Toy", family="toy", vocab_size=10, hidden_size=4, num_layers=layers, num_heads=1, num_kv_heads=1,
        head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=16, tie_word_embeddings=False,
        qkv_bias=False, o_bias=False, qk_norm="none", clip_qkv=None, sliding_window=(None,) * layers,
        num_experts=experts, expert_width=2, router=RouterSpec(top_k, True, False), moe_layers=tuple(range(layers)),
        dense_intermediate_size=0, shared_expert_width=0, moe_prefixes=("mlp",), bos_token_id=None, eos_token_ids=(),
        torch_dtype="float32",
    )


def make_cache(slots, policy=None, spec=None):
    spec = spec or toy_spec()
    source = CountingSource(spec)
    store = ExpertStore(source, spec, torch.float32, pin=False)
    return ExpertCache(store, slots, torch.device("cpu"), (policy or LRUPolicy)(spec.num_layers, spec.num_experts)), source


def use(cache, layer, experts):
    got = cache.acquire(layer, experts)
    cache.release(list(got.values()))
    return got


def test_slots_hold_the_right_expert_and_lru_evicts_the_least_recent():
    cache, source = make_cache(slots=6)  # 2 per layer
    use(cache, 1, [0, 1])
    use(cache, 2, [0, 1])  # no free slot left: layer 0 must now evict within its quota
    use(cache, 0, [1, 2])
    assert cache.pool[cache.slot_of[0, 1]][0].item() == 1.0 and cache.pool[cache.slot_of[0, 2]][0].item() == 2.0
    use(cache, 0, [1])  # 2 is now the least recent of layer 0
    use(cache, 0, [3])
    assert cache.slot_of[0, 2] == -1 and cache.slot_of[0, 1] >= 0 and cache.slot_of[0, 3] >= 0
    s = cache.stats.per_layer[0]
    assert (s.hits, s.misses, s.bytes_moved) == (1, 3, 3 * cache.expert_bytes)
    assert source.reads == 7, "the host store reads each expert from the source once"
    use(cache, 0, [2])
    assert source.reads == 7


def test_a_layer_under_quota_takes_slots_from_the_layer_most_over_it():
    cache, _ = make_cache(slots=6)
    use(cache, 0, [0, 1, 2, 3, 4, 5])  # free slots first: layer 0 holds 6, quota 2
    assert cache.resident_count(0) == 6
    use(cache, 1, [0, 1])
    assert cache.resident_count(0) == 4 and cache.resident_count(1) == 2
    use(cache, 1, [2])  # layer 1 is at quota: it evicts its own least recent
    assert cache.resident_count(1) == 2 and cache.slot_of[1, 0] == -1


def test_pinned_slots_are_never_evicted_and_rounds_cover_every_expert():
    cache, _ = make_cache(slots=3)
    got = cache.acquire(0, [0, 1, 2, 3, 4])
    assert len(got) == 3, "only as many experts as slots; the caller runs another round for the rest"
    assert cache.acquire(1, [0]) == {}, "every slot is pinned by the compute in flight"
    cache.release(list(got.values()))
    assert len(cache.acquire(0, [3, 4])) == 2


def test_lfu_keeps_the_frequently_used():
    cache, _ = make_cache(slots=6, policy=LFUPolicy)
    use(cache, 1, [0, 1])
    use(cache, 2, [0, 1])
    for _ in range(3):
        use(cache, 0, [1])
    use(cache, 0, [2])
    use(cache, 0, [3])  # layer 0 holds 1 (3 uses) and 2 (1 use): 2 goes, although 1 is older
    assert cache.slot_of[0, 1] >= 0 and cache.slot_of[0, 2] == -1


def test_full_budget_preloads_a_fixed_table():
    cache, source = make_cache(slots=18)
    assert cache.fully_resident and source.reads == 18
    assert cache.slot_table.tolist() == [[l * 6 + e for e in range(6)] for l in range(3)]
    assert cache.stats.preload_bytes == 18 * cache.expert_bytes
    for layer, li in ((0, 0), (2, 2)):
        gate_up, down = cache.layer_weights(layer)  # the layer's slice, indexed by expert id
        assert torch.equal(gate_up, cache.w_gate_up[cache.slot_table[li].long()])
        assert torch.equal(down, cache.w_down[cache.slot_table[li].long()])
    with pytest.raises(RuntimeError, match="only a fully resident pool"):
        make_cache(slots=6)[0].layer_weights(0)


def test_prefetch_queues_within_quota_and_demand_promotes_it():
    cache, _ = make_cache(slots=6)
    use(cache, 0, [0, 1])
    use(cache, 1, [0, 1])
    assert cache.enqueue_prefetch(2, [5, 4, 3]) == 2, "a layer prefetches no more than its quota"
    assert cache.transfer.is_queued(int(cache.slot_of[2, 5]))
    got = use(cache, 2, [5])
    assert not cache.transfer.is_queued(got[5]) and cache.pool[got[5]][0].item() == 205.0
    s = cache.stats.per_layer[2]
    assert (s.hits, s.prefetch_hits) == (1, 1)
    assert s.prefetches == 2 and cache.transfer.num_queued == 0, "one promoted, the other issued behind the demand"


class ScriptedPredictor(PredictorBase):
    """Predicts a fixed, partly wrong set of experts for every layer."""

    def __init__(self, spec):
        self.spec, self.observed = spec, 0

    def predict(self, step):
        g = np.random.default_rng(step.batch_size)
        return Prediction(g.random((self.spec.num_moe_layers, self.spec.num_experts)))

    def observe(self, step, routes):
        self.observed += 1


@pytest.mark.parametrize("budget", ["25%", "1/layer"])
def test_prefetching_never_changes_the_tokens(budget, checkpoint):
    model = str(checkpoint("qwen3_moe", "fused"))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[0, 5, 6, 7, 8], [0, 200, 13]]
    plain = LLM(model, device="cpu", expert_budget=budget, max_model_len=64).generate(prompts, params)
    llm = LLM(model, device="cpu", expert_budget=budget, max_model_len=64)
    llm.engine.set_predictor(ScriptedPredictor(llm.engine.spec))
    predicted = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in predicted] == [o.outputs[0].token_ids for o in plain]
    assert predicted.stats.cache.prefetches > 0
    assert llm.engine.predictor.observed == 16, "every step, prefill included"


def test_clear_empties_the_pool_in_place_as_a_new_cache_would_start():
    cache, _ = make_cache(slots=6)
    pool, table = cache.pool, cache.slot_table
    use(cache, 0, [0, 1])
    use(cache, 1, [2, 3, 4])  # over its quota: takes the free slots
    cache.clear(LRUPolicy(3, 6))
    assert cache.pool is pool and cache.slot_table is table, "the tensors graphs captured stay"
    assert (cache.slot_of == -1).all() and (table == -1).all() and cache.owner == [None] * 6
    assert len(cache._free) == 6 and list(cache.order.quota) == [2, 2, 2]
    assert cache.stats.total().hits == cache.stats.total().misses == 0
    got = use(cache, 0, [5])
    assert cache.stats.total().misses == 1 and cache.pool[got[5]][0].item() == 5.0
    assert table[0, 5].item() == got[5]


def test_clear_refuses_a_pool_in_use_and_a_resident_one():
    cache, _ = make_cache(slots=6)
    cache.acquire(0, [0])  # pinned, not released
    with pytest.raises(RuntimeError, match="holds some of its slots"):
        cache.clear(LRUPolicy(3, 6))
    resident, _ = make_cache(slots=18)
    with pytest.raises(RuntimeError, match="fixed mapping"):
        resident.clear(LRUPolicy(3, 6))
