"""On CUDA: every predictor, budget and batch gives, under decode graphs, the tokens eager decoding gives without
a predictor; a non-exact selector runs under graphs; graphs are captured at start-up only.

Run on a GPU machine with `pytest -m gpu`; skipped elsewhere.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import grid_predictors, heldout_prompts, run_grid_cell
from moeflow import LLM
from moeflow.assets import default_model_dir
from moeflow.config import CacheConfig, EngineConfig, ExpertBudget, budget_text
from moeflow.engine.engine import LLMEngine
from moeflow.sampling import SamplingParams
from moeflow.weights.synthetic import SyntheticCheckpoint
from test_hooks import RowSpy

pytestmark = pytest.mark.gpu
STEPS = 12
BATCHES = (1, 2, 4, 8)


@contextlib.contextmanager
def eager(engine):
    """Decode without the captured graphs, for the reference run."""
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        yield
    finally:
        engine.runner.graphs = graphs


def grid(runner, engine, prompts, learned=None):
    smallest = budget_text(engine.spec.router.top_k * engine.store.expert_bytes)
    for budget in [smallest, "10%", "25%", "50%", "75%", "100%"]:
        engine.set_predictor(None)
        engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
        assert engine.runner.graphs is not None
        with eager(engine):
            reference = {b: run_grid_cell(runner, prompts[:b], STEPS)[0] for b in BATCHES}
        for name, make in grid_predictors(engine.spec, learned).items():
            for graphed in (True, False):
                engine.set_predictor(make())
                engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
                with contextlib.nullcontext() if graphed else eager(engine):
                    for b in BATCHES:
                        got, stats = run_grid_cell(runner, prompts[:b], STEPS)
                        assert stats.graph_captures == 0
                        for i, ((tokens, lp), (ref, ref_lp)) in enumerate(zip(got, reference[b])):
                            where = f"{budget}, {name}, {'graphs' if graphed else 'eager'}, batch {b}, seq {i}"
                            assert tokens == ref, where
                            assert max(abs(a - r) for a, r in zip(lp, ref_lp)) < 1e-3, where
    engine.set_predictor(None)


def test_exactness_grid_on_the_bundled_model():
    from moeflow.routing.predictors import find_predictor, load_predictor

    llm = LLM(str(default_model_dir()), device="cuda", dtype="bfloat16", max_model_len=96, max_num_seqs=8)
    e = llm.engine
    shipped = find_predictor(default_model_dir())
    grid(llm, e, heldout_prompts(llm.tokenizer, max(BATCHES)),
         learned=lambda: load_predictor(shipped, e.checkpoint, e.device, embedding=e.model.w["model.embed_tokens.weight"]))


def test_exactness_grid_on_a_qwen3_shaped_model():
    checkpoint = SyntheticCheckpoint.preset("qwen3-30b-a3b-8l", seed=0, dtype=torch.bfloat16, device=torch.device("cuda"))
    engine = LLMEngine(EngineConfig(model="<synthetic>", device="cuda", dtype="bfloat16", max_model_len=96,
                                    max_num_seqs=8), skip_tokenizer_init=True, checkpoint=checkpoint)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, engine.spec.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 14, 7, 11, 6, 16, 8)]
    grid(LLM.from_engine(engine), engine, prompts)


@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_a_toy_selector_under_graphs_equals_eager_and_leaves_exact_rows(budget):
    from helpers import greedy

    model = str(default_model_dir())
    llm = LLM(model, device="cuda", dtype="float32", max_model_len=96, max_num_seqs=8, expert_budget=budget)
    prompts = heldout_prompts(llm.tokenizer, 3)  # padded to the bucket of 4: the padding row must not count
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(STEPS))]
    llm.engine.set_selector(RowSpy())
    assert llm.engine.runner.graphs is not None
    params = [greedy(STEPS), greedy(STEPS, routing="lynx"), greedy(STEPS, routing="lynx")]
    graphed = llm.generate(prompts, params)
    with eager(llm.engine):
        reference = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in reference]
    assert graphed[0].outputs[0].token_ids == plain[0], "the exact row is untouched"
    assert graphed.stats.remapped_picks == reference.stats.remapped_picks > 0
    assert graphed.stats.distinct_experts == reference.stats.distinct_experts


def test_mixed_context_lengths_under_graphs_equal_eager_and_nothing_is_captured_while_serving():
    """50 prompts of 50 different lengths through one engine: decode graphs keyed by batch size alone were all
    captured at start-up, and graphs and eager give the same tokens."""
    llm = LLM(str(default_model_dir()), device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=16,
              expert_budget="25%")
    engine = llm.engine
    captured = engine.graph_captures
    assert captured > 0 and engine.graph_capture_s > 0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, engine.spec.vocab_size, (n,), generator=g).tolist() for n in range(3, 403, 8)]
    params = [SamplingParams(max_tokens=8 + i % 5, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    graphed = llm.generate(prompts, params)
    assert engine.graph_captures == captured and graphed.stats.graph_captures == 0
    with eager(engine):
        reference = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in reference]
