"""A layer computed in rounds reads, in each round, every needed expert the device table shows: those the
round acquired and those kept from an earlier round, whose picks it computes again. Each slot it reads must be
marked read after it (TransferEngine.mark_read), or a later round's refill of that slot, which waits only for
the marked reads, can overwrite the expert while the GPU still computes with it (a race the CPU, where every
call completes at once, never shows: on an H100 the bench model's tokens changed with rounds by value, which
evict a layer's computed experts first)."""

from __future__ import annotations

import pytest

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.experts import compute as compute_module
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.routing.predictors import load_predictor

PROMPTS = [[0, 464, 3290, 318, 262], [0, 1000, 7, 88], [0, 4000], [0, 77, 1234, 9, 10, 11, 12],
           [0, 5, 6, 7], [0, 900, 901], [0, 42, 43, 44, 45], [0, 3000, 2999]]


@pytest.mark.parametrize("planner", ["lru", "rounds by value"])
def test_every_slot_a_round_reads_is_marked_read_after_it(planner, monkeypatch):
    llm = LLM(str(default_model_dir()), device="cpu", max_model_len=64, max_num_seqs=8, expert_budget="10%")
    engine = llm.engine
    if planner == "rounds by value":
        engine.set_predictor(load_predictor(default_model_dir() / "predictor", engine.checkpoint, engine.device),
                             ExpertFlowPlanner(rounds=1))
    log: list[tuple[str, set[int]]] = []
    rows = compute_module.fused_moe_rows

    def reading(x, slot_ids, *args, **kwargs):
        log.append(("read", set(slot_ids[slot_ids >= 0].tolist())))
        return rows(x, slot_ids, *args, **kwargs)

    monkeypatch.setattr(compute_module, "fused_moe_rows", reading)
    cache = engine.cache
    mark_read, release = cache.transfer.mark_read, cache.release
    monkeypatch.setattr(cache.transfer, "mark_read", lambda slots: (log.append(("marked", set(slots))),
                                                                   mark_read(slots))[1])
    monkeypatch.setattr(cache, "release", lambda slots, *a, **k: (log.append(("released", set(slots))),
                                                                 release(slots, *a, **k))[1])
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 12 for o in out)
    reads = [i for i, (kind, _) in enumerate(log) if kind == "read"]
    assert reads, "the layers ran on the cache"
    kept_from_before = 0
    for i in reads:
        read = log[i][1]
        released, marked = log[i + 1], log[i + 2]
        assert released[0] == "released" and marked[0] == "marked"
        assert read <= marked[1], "a slot the round read is not marked read after it"
        kept_from_before += not read <= released[1]
    assert kept_from_before > 0, "some round computed again an expert kept from an earlier round"

