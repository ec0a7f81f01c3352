"""LYNX in the engine: exact requests beside LYNX ones decode as with no selector, and decode graphs choose what
eager steps choose, resident and offloaded, cache-aware or not."""

from __future__ import annotations

import pytest
import torch

from moeflow.routing.lynx import AffinityBinning


def heldout_prompts(n: int, lengths=(5, 9, 14, 20)) -> list[list[int]]:
    from moeflow.assets import default_model_dir
    from moeflow.evaluation.documents import load_documents
    from moeflow.tokenizer import Tokenizer

    tok = Tokenizer(default_model_dir())
    docs = load_documents(["tests/data/heldout"], max_docs=n)
    return [tok.encode(d.text)[: lengths[i % len(lengths)]] for i, d in enumerate(docs)]


def mixed_run(prompts, max_tokens: int, selector: bool, resident_weight: int = 0, **llm_kw):
    """Greedy outputs of a batch whose even requests ask for LYNX (when a selector is offered), and its stats.
    Up to 8 sequences decode at once: 6 prompts fill a graph bucket of 8 with two padding rows."""
    from moeflow import LLM, SamplingParams
    from moeflow.assets import default_model_dir

    llm = LLM(str(default_model_dir()), max_model_len=128, max_num_seqs=8, **llm_kw)
    if selector:
        llm.engine.set_selector(AffinityBinning.for_spec(llm.engine.spec, resident_weight=resident_weight))
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                             routing="lynx" if selector and i % 2 == 0 else "exact") for i in range(len(prompts))]
    out = llm.generate(prompts, params)
    return llm, [o.outputs[0].token_ids for o in out], out.stats


def test_in_the_engine_exact_requests_decode_as_without_a_selector():
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompts = heldout_prompts(6)
        _, plain, _ = mixed_run(prompts, 12, selector=False, device="cpu", dtype="float32")
        _, mixed, stats = mixed_run(prompts, 12, selector=True, device="cpu", dtype="float32")
    finally:
        torch.set_num_threads(torch_threads)
    assert [t for i, t in enumerate(mixed) if i % 2] == [t for i, t in enumerate(plain) if i % 2]
    assert stats.remapped_picks > 0, "the LYNX requests were remapped"


@pytest.mark.gpu
@pytest.mark.parametrize("budget,resident_weight", [("100%", 0), ("25%", 0), ("25%", 2)])
def test_in_the_engine_graphs_decode_as_eager_and_exact_requests_as_without_a_selector(budget, resident_weight):
    """Six requests (padded to the graph bucket of 8), every other one asking for LYNX, decoded greedily
    with CUDA graphs and eagerly: the same tokens; the exact requests' tokens are those of a run with no
    selector at all. float32, so that graph and eager round alike; offloaded too, cache-aware or not."""
    prompts = heldout_prompts(6)
    kw = dict(device="cuda", dtype="float32", expert_budget=budget)
    llm, graphed, stats = mixed_run(prompts, 24, selector=True, resident_weight=resident_weight, **kw)
    assert llm.engine.runner.graphs is not None and stats.graph_captures == 0, "decode replayed start-up graphs"
    _, eager, eager_stats = mixed_run(prompts, 24, selector=True, resident_weight=resident_weight,
                                      enforce_eager=True, **kw)
    _, plain, _ = mixed_run(prompts, 24, selector=False, **kw)
    assert graphed == eager
    assert (stats.distinct_experts, stats.remapped_picks) == (eager_stats.distinct_experts, eager_stats.remapped_picks)
    assert (stats.cache.hits, stats.cache.misses) == (eager_stats.cache.hits, eager_stats.cache.misses)
    assert stats.remapped_picks > 0, "the LYNX requests were remapped"
    assert [t for i, t in enumerate(graphed) if i % 2] == [t for i, t in enumerate(plain) if i % 2]
