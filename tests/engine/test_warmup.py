"""The start-up prefill warm-up (moeflow/engine/warmup.py) covers the step's token budget and leaves no trace.

The engine runs it on CUDA only (the CPU has nothing to compile); these tests call it on the CPU, on the same
code path, and check that what a run measures or decides afterwards is what it would have been without it.
"""

from __future__ import annotations

import dataclasses

import pytest

from helpers import greedy, heldout_prompts
from moeflow import LLM
from moeflow.assets import default_model_dir
from moeflow.engine.warmup import FIRST, warm_prefill, warmup_sizes


@pytest.mark.parametrize("budget,max_len,rows", [(4096, 512, 32), (4096, 64, 8), (100, 4096, 4), (16, 16, 1),
                                                 (8192, 2048, 2), (10, 64, 1)])
def test_sizes_grow_to_the_token_budget_within_the_kv_rows_and_context(budget, max_len, rows):
    steps = warmup_sizes(budget, max_len, rows)
    totals = [sum(s) for s in steps]
    assert totals == sorted(set(totals)), "each step is larger than the one before"
    assert totals[0] == min(FIRST, budget)
    assert totals[-1] == min(budget, rows * max_len), "the last step fills the budget as far as the KV rows allow"
    for lengths in steps:
        assert 1 <= len(lengths) <= rows and all(1 <= n <= max_len for n in lengths)
        assert max(lengths) - min(lengths) <= 1, "the tokens spread evenly over the prompts"


def _run(budget: str, warm: bool) -> tuple[list[list[int]], dict, list, float]:
    llm = LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=128, max_num_seqs=4,
              expert_budget=budget)
    engine = llm.engine
    seconds = warm_prefill(engine, engine.config.cache) if warm else 0.0
    counters = dict(engine.counters)
    stats = [dataclasses.asdict(s) for s in engine.cache.stats.per_layer.values()]
    prompts = heldout_prompts(llm.tokenizer, 4)
    outs = llm.generate(prompts, greedy(12))
    return [o.outputs[0].token_ids for o in outs], counters, stats, seconds


@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_warm_prefill_leaves_the_cache_counters_and_tokens_as_they_were(budget):
    cold_tokens, cold_counters, cold_stats, _ = _run(budget, warm=False)
    tokens, counters, stats, seconds = _run(budget, warm=True)
    assert seconds > 0
    assert counters == cold_counters
    assert stats == cold_stats, "the warm-up's expert loads and hits are not the run's"
    assert tokens == cold_tokens
