"""The hooks around a step leave exact mode exact: predictors, selectors' context, scheduling policies.

On the CPU every step runs eagerly; tests/engine/test_gpu_hooks.py runs the same grid with CUDA graphs.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import grid_predictors, heldout_prompts, run_grid_cell
from moeflow import LLM
from moeflow.assets import default_model_dir
from moeflow.config import CacheConfig, ExpertBudget, budget_text
from moeflow.engine.policies.fcfs import FCFSPolicy, admit_in_order
from moeflow.engine.scheduler import StepPlan
from moeflow.routing.router import Routing
from moeflow.routing.selection import SelectionContext

STEPS = 10
BATCHES = (1, 2, 4, 8)


def budgets(engine) -> list[str]:
    """The smallest budget the model runs at (one token's top-k), 10%, 25%, 50%, 75% and 100%."""
    smallest = budget_text(engine.spec.router.top_k * engine.store.expert_bytes)
    return [smallest, "10%", "25%", "50%", "75%", "100%"]


@pytest.fixture(scope="module")
def bundled():
    llm = LLM(str(default_model_dir()), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=8)
    return llm, heldout_prompts(llm.tokenizer, max(BATCHES))


def test_every_predictor_at_every_budget_and_batch_gives_the_exact_tokens(bundled):
    llm, prompts = bundled
    engine = llm.engine
    engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("100%")))
    reference = {b: run_grid_cell(llm, prompts[:b], STEPS)[0] for b in BATCHES}
    prefetched = 0
    for budget in budgets(engine):
        for name, make in grid_predictors(engine.spec).items():
            engine.set_predictor(make())
            engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
            for b in BATCHES:
                got, stats = run_grid_cell(llm, prompts[:b], STEPS)
                prefetched += stats.cache.prefetches
                for i, ((tokens, logprobs), (ref_tokens, ref_logprobs)) in enumerate(zip(got, reference[b])):
                    where = f"budget {budget}, predictor {name}, batch {b}, sequence {i}"
                    assert tokens == ref_tokens, where
                    assert max(abs(a - r) for a, r in zip(logprobs, ref_logprobs)) < 1e-5, where
    engine.set_predictor(None)
    assert prefetched > 0, "the predictors did prefetch"


def test_decode_steps_count_the_host_time_a_predictor_and_its_planner_take(bundled):
    llm, prompts = bundled
    engine = llm.engine
    engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("25%")))
    before = engine.counters["predictor_s"]
    run_grid_cell(llm, prompts[:2], STEPS)
    assert engine.counters["predictor_s"] == before, "no predictor, no predictor time"
    for name, make in grid_predictors(engine.spec).items():
        if name == "none":
            continue
        engine.set_predictor(make())
        engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("25%")))
        was, decode_was = engine.counters["predictor_s"], engine.counters["decode_s"]
        run_grid_cell(llm, prompts[:2], STEPS)
        spent = engine.counters["predictor_s"] - was
        assert 0 < spent < 2 * (engine.counters["decode_s"] - decode_was), name
    engine.set_predictor(None)


def test_the_decode_steps_host_time_is_split_by_phase(bundled):
    """Forecast.phase_s: predict, plan, refine, correct and observe over the decode steps add up to the decode steps'
    predictor_s; with the shipped predictor and ExpertFlow's planner at 25%, every phase takes some time."""
    from moeflow.engine.forecast import PHASES
    from moeflow.routing.predictors import load_predictor
    from moeflow.routing.predictors.net import find_predictor

    llm, prompts = bundled
    engine = llm.engine
    engine.set_predictor(load_predictor(find_predictor(default_model_dir()), engine.checkpoint))
    engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("25%")))
    was, phases_were = engine.counters["predictor_s"], dict(engine.forecast.phase_s)
    run_grid_cell(llm, prompts[:2], STEPS)
    phases = {p: engine.forecast.phase_s[p] - phases_were[p] for p in PHASES}
    assert all(secs > 0 for secs in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(engine.counters["predictor_s"] - was, rel=1e-9)
    engine.set_predictor(None)


def test_refined_scores_are_computed_only_for_a_planner_that_reads_them(bundled):
    from moeflow.experts.predictive import ExpertFlowPlanner
    from moeflow.routing.predictors import make_predictor

    llm, prompts = bundled
    engine = llm.engine
    calls = []
    for planner, wanted in ((ExpertFlowPlanner(), True), (ExpertFlowPlanner(correct=False), False)):
        predictor = make_predictor("frequency", engine.spec)
        predictor.refine = lambda step, layer, routes: calls.append(layer)  # returns None: no refinement
        engine.set_predictor(predictor, planner)
        engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("25%")))
        n = len(calls)
        run_grid_cell(llm, prompts[:2], 4)
        assert (len(calls) > n) == wanted, f"correct={planner.correct}"
    engine.set_predictor(None)


class HalfDecode(FCFSPolicy):
    """Admits as fcfs does, but decodes only every other running sequence each step (alternating)."""

    name = "half"

    def __init__(self):
        self.flip = 0

    def plan(self, waiting, running, ctx):
        admitted = admit_in_order(waiting, ctx)
        if admitted:
            return StepPlan(admit=admitted)
        self.flip ^= 1
        half = [s for i, s in enumerate(running) if i % 2 == self.flip] or running[:1]
        return StepPlan(decode=half)


def test_a_policy_that_decodes_a_subset_finishes_every_request_with_its_own_tokens(bundled):
    llm, prompts = bundled
    model = str(default_model_dir())
    alone = [run_grid_cell(LLM(model, device="cpu", dtype="float32", max_model_len=64, expert_budget="25%"),
                           [p], STEPS)[0][0] for p in prompts[:5]]
    engine = LLM(model, device="cpu", dtype="float32", max_model_len=64, max_num_seqs=8, expert_budget="25%").engine
    engine.scheduler.policy = HalfDecode()
    from helpers import greedy

    for i, p in enumerate(prompts[:5]):
        engine.add_request(str(i), p, greedy(STEPS, logprobs=0))
    done, sizes = {}, []
    while engine.has_unfinished_requests():
        outs = engine.step()
        sizes.append(len(outs))
        for o in outs:
            if o.finished:
                done[o.request_id] = o.outputs[0]
    assert max(sizes[1:]) <= 3, "decode steps took a subset"
    for i in range(5):
        c = done[str(i)]
        assert c.token_ids == alone[i][0]
        assert max(abs(d[t] - r) for d, t, r in zip(c.logprobs, c.token_ids, alone[i][1])) < 1e-5


def test_fcfs_decodes_the_longest_waiting_when_more_run_than_a_step_takes(bundled):
    model = str(default_model_dir())
    llm = LLM(model, device="cpu", dtype="float32", max_model_len=64, max_num_seqs=6, max_batch_size=4)
    engine = llm.engine
    from helpers import greedy

    for i, p in enumerate(bundled[1][:6]):
        engine.add_request(str(i), p, greedy(6))
    engine.step()  # one prefill admits all six (six KV rows)
    assert engine.num_running == 6
    seen = []
    for _ in range(3):
        seen.append(sorted(o.request_id for o in engine.step()))
    assert all(len(s) == 4 for s in seen), "a decode step takes max_batch_size sequences"
    assert set(seen[0]) | set(seen[1]) == {str(i) for i in range(6)}, "every sequence decodes within two steps"


class RowSpy:
    """A non-exact toy selector: every non-exact real row's last pick moves to the batch's most used expert.
    It records what it was shown."""

    name = "lynx"  # a routing mode requests may name; this toy stands in for the real selector

    def __init__(self):
        self.seen = []

    def select(self, layer, routing: Routing, ctx: SelectionContext) -> Routing:
        self.seen.append((ctx.is_prefill, ctx.real.clone(), ctx.exact.clone()))
        if ctx.is_prefill:
            return routing
        E = routing.logits.shape[-1]
        votes = torch.zeros(E, device=routing.ids.device).index_add_(
            0, routing.ids.flatten(), ctx.real.float().repeat_interleave(routing.ids.shape[1]))
        top = votes.argmax()
        ids = routing.ids.clone()
        change = ctx.real & ~ctx.exact & (ids != top).all(dim=1)
        ids[:, -1] = torch.where(change, top, ids[:, -1])
        return Routing(ids, routing.weights, routing.logits)


def test_a_toy_selector_sees_real_and_exact_rows_and_never_touches_exact_ones():
    model = str(default_model_dir())
    prompts = heldout_prompts(LLM(model, device="cpu", max_model_len=64).tokenizer, 3)
    from helpers import greedy

    plain = LLM(model, device="cpu", dtype="float32", max_model_len=64, expert_budget="25%")
    exact_ref = run_grid_cell(plain, prompts, STEPS)[0]
    llm = LLM(model, device="cpu", dtype="float32", max_model_len=64, expert_budget="25%")
    spy = RowSpy()
    llm.engine.set_selector(spy)
    params = [greedy(STEPS, logprobs=0), greedy(STEPS, logprobs=0, routing="lynx"), greedy(STEPS, logprobs=0)]
    out = llm.generate(prompts, params)
    for i in (0, 2):
        assert out[i].outputs[0].token_ids == exact_ref[i][0], "exact rows are never changed"
    assert out.stats.remapped_picks > 0, "the toy selector did rewrite picks"
    decode = [(real, exact) for prefill, real, exact in spy.seen if not prefill]
    assert decode and all(real.all() and exact.tolist() == [True, False, True] for real, exact in decode)
    # a batch of only exact requests never calls the selector
    spy.seen.clear()
    llm.generate(prompts[:2], greedy(4))
    assert spy.seen == []
    with pytest.raises(Exception, match="not offered"):
        LLM(model, device="cpu", max_model_len=64, routing_modes=("exact",)).generate(prompts[:1],
                                                                                      greedy(2, routing="lynx"))
    assert math.isfinite(out.stats.distinct_experts_per_layer_step)
