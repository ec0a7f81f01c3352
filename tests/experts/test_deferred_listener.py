"""The route listener hears each offloaded layer late: after the next router is enqueued, before that layer's
experts are acquired. The cache's every choice is the same as with the immediate call."""

from __future__ import annotations

import pytest

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.routing.predictors import load_predictor
from moeflow.weights.checkpoint import Checkpoint

from test_replay import FIELDS

PROMPTS = ["The river", "In 1852 the", "def parse(", "Results:"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def predictive_llm(device: str = "cpu", budget: str = "25%", defer: bool = True) -> LLM:
    llm = LLM(str(default_model_dir()), device=device, max_model_len=64, expert_budget=budget)
    engine = llm.engine
    engine.set_predictor(load_predictor(default_model_dir() / "predictor", Checkpoint(default_model_dir()),
                                        engine.device))
    engine.planner = ExpertFlowPlanner()
    engine.model.experts.defer_listener = defer
    return llm


def run(llm: LLM, n: int = 10):
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    table = [[getattr(s, f) for f in FIELDS] for _, s in sorted(llm.last_stats.per_layer.items())]
    return [o.outputs[0].token_ids for o in out], table, llm.last_stats.cache


def log_events(llm: LLM) -> list[tuple[str, int]]:
    """Record, in order: each router ("route", MoE ordinal), each acquire ("acquire", ordinal), each layer the
    listener hears ("heard", ordinal) and each step's end ("end", -1)."""
    engine, events = llm.engine, []
    model, cache, experts = engine.model, engine.cache, engine.model.experts
    moe = list(model.spec.moe_layers)
    route, acquire, listener, step = model.attention_and_route, cache.acquire, experts.route_listener, engine.step

    def routed(layer, *a, **k):
        out = route(layer, *a, **k)
        events.append(("route", moe.index(layer)))
        return out

    def acquired(layer, *a, **k):
        events.append(("acquire", moe.index(layer)))
        return acquire(layer, *a, **k)

    def heard(layer, used):
        events.append(("heard", moe.index(layer)))
        return listener(layer, used)

    def stepped():
        out = step()
        events.append(("end", -1))
        return out

    model.attention_and_route, cache.acquire, experts.route_listener, engine.step = routed, acquired, heard, stepped
    return events


def test_each_layer_is_heard_once_after_the_next_router_and_before_its_experts():
    llm = predictive_llm()
    events = log_events(llm)
    run(llm, 6)
    L = len(llm.engine.spec.moe_layers)
    steps, cur = [], []
    for e in events:
        if e[0] == "end":
            steps.append(cur)
            cur = []
        else:
            cur.append(e)
    assert len(steps) >= 6
    for ev in steps:
        heard = [i for kind, i in ev if kind == "heard"]
        assert heard == list(range(L)), "every MoE layer heard once, in order, within its own step"
        for layer in range(L - 1):
            at = ev.index(("heard", layer))
            # the next layer's router was enqueued before, and none of its experts acquired yet
            assert ev.index(("route", layer + 1)) < at < ev.index(("acquire", layer + 1))
            assert ev.index(("acquire", layer)) < at


def test_immediate_call_hears_before_the_next_router():
    """The comparison arm does what it says (so that the A/B of tools/overlap_ab.py compares two orders)."""
    llm = predictive_llm(defer=False)
    events = log_events(llm)
    run(llm, 3)
    assert events.index(("heard", 0)) < events.index(("route", 1))


@pytest.mark.parametrize("budget", ["1/layer", "10%", "25%"])
def test_deferring_changes_no_choice_of_the_cache(budget):
    tokens, table, cache = run(predictive_llm(budget=budget, defer=True), 12)
    tokens_now, table_now, cache_now = run(predictive_llm(budget=budget, defer=False), 12)
    assert tokens == tokens_now
    assert table == table_now, "hits, misses, prefetches and bytes per layer are the same"
    assert cache.prefetches == cache_now.prefetches > 0


def test_a_step_that_failed_midway_leaves_nothing_for_the_next():
    llm = predictive_llm()
    experts = llm.engine.model.experts
    heard = []
    experts.route_listener = lambda layer, used: heard.append(layer)
    experts._pending = (llm.engine.spec.moe_layers[-1], [0])  # what a step that raised would leave behind
    run(llm, 2)
    first = heard[: len(llm.engine.spec.moe_layers)]
    assert first == list(llm.engine.spec.moe_layers), "the stale layer was not heard at the next step"


@pytest.mark.gpu
@pytest.mark.parametrize("budget", ["1/layer", "25%"])
def test_gpu_graphs_defer_without_changing_a_choice(budget):
    llm = predictive_llm("cuda", budget)
    assert llm.engine.runner.graphs is not None, "decode runs as CUDA graphs"
    events = log_events(llm)
    tokens, table, _ = run(llm, 12)
    decode = [e for e in events if e[0] in ("heard", "acquire")]
    assert decode.count(("heard", 0)) >= 12
    now = predictive_llm("cuda", budget, defer=False)
    assert run(now, 12)[:2] == (tokens, table)
