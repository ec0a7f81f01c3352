"""The replay drives the real cache as the engine does: on the same routes it reports what the engine reports."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import ReplayStep, belady, decode_steps, lanes, make_cache, replay
from moeflow.routing.predictors import Prediction, load_predictor
from moeflow.routing.record import StepRoutes
from moeflow.weights.checkpoint import Checkpoint

FIELDS = ("hits", "misses", "bytes_moved", "prefetches", "prefetch_bytes", "prefetch_hits", "wasted_prefetches")
PROMPTS = [[0, 464, 3290, 318, 262, 1000, 17], [0, 1000, 7, 88], [0, 4000, 33], [0, 12, 99, 512, 640]]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recording(ExpertFlowPlanner):
    """Notes what the engine hands plan(), so the replay can hand the same."""

    got = None

    def plan(self, cache, scores):
        self.got = scores
        super().plan(cache, scores)


def engine_run(budget: str, predictor=None, planner=None):
    """The bundled model through LLM on the CPU: its per-layer cache stats, the steps it took, its cache."""
    llm = LLM(str(default_model_dir()), device="cpu", max_model_len=64, expert_budget=budget, max_num_seqs=4)
    steps: list[ReplayStep] = []

    def keep(view, routes):
        steps.append(ReplayStep(view, StepRoutes(routes.ids.copy(), routes.router_ids.copy(), routes.used.copy(),
                                                 list(routes.rows))))

    llm.engine.add_route_listener(keep)
    if predictor is not None:
        llm.engine.set_predictor(predictor)
        llm.engine.planner = planner
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 9, 14, 5)]
    out = llm.generate(PROMPTS, params)
    return out.stats.per_layer, steps, llm.engine.cache


def as_table(per_layer) -> list[list[int]]:
    return [[getattr(s, f) for f in FIELDS] for _, s in sorted(per_layer.items())]


@pytest.mark.parametrize("budget", ["25%", "1/layer"])
def test_lru_replay_equals_the_engine(budget):
    per_layer, steps, cache = engine_run(budget)
    assert any(st.view.is_prefill for st in steps) and any(not st.view.is_prefill for st in steps)
    spec = Checkpoint(default_model_dir()).spec
    r = replay(steps, make_cache(spec, cache.num_slots, cache.expert_bytes))
    assert as_table(r.per_layer) == as_table(per_layer)


@pytest.mark.parametrize("budget", ["25%", "10%"])
def test_predictive_replay_equals_the_engine(budget):
    model = default_model_dir()
    ckpt = Checkpoint(model)
    planner = Recording()
    per_layer, steps, cache = engine_run(budget, load_predictor(model / "predictor", ckpt), planner)
    assert sum(s.prefetches for s in per_layer.values()) > 0
    whole = isinstance(planner.got, Prediction)
    r = replay(steps, make_cache(ckpt.spec, cache.num_slots, cache.expert_bytes),
               load_predictor(model / "predictor", ckpt), ExpertFlowPlanner(), whole_prediction=whole)
    assert as_table(r.per_layer) == as_table(per_layer)


def test_lanes_decode_every_row_once_and_refill_finished_lanes():
    seqs = [slice(0, 3), slice(3, 4), slice(4, 9), slice(9, 11)]
    steps = lanes(seqs, 2)
    rows = np.concatenate(steps)
    assert sorted(rows.tolist()) == list(range(11))
    assert [s.tolist() for s in steps[:3]] == [[0, 3], [1, 4], [2, 5]], "sequence 1 ended: sequence 2 took its lane"
    assert max(len(s) for s in steps) == 2


def tiny():
    """The bundled model's directory, checkpoint and spec."""
    model = default_model_dir()
    ckpt = Checkpoint(model)
    return model, ckpt, ckpt.spec


def test_belady_is_a_floor_for_lru_and_the_predictive_cache():
    model, ckpt, spec = tiny()
    rng = np.random.default_rng(0)
    # routes with structure: each sequence keeps to a few experts per layer
    n, L, E, K = 400, spec.num_moe_layers, spec.num_experts, spec.router.top_k
    favourite = rng.integers(0, E, (4, L, 8))
    routes = np.stack([np.stack([rng.choice(favourite[i // 100, l], K, replace=False) for l in range(L)])
                       for i in range(n)]).astype(np.int16)
    seqs = [slice(a, a + 100) for a in range(0, n, 100)]
    steps = decode_steps(rng.integers(1, 8000, n), routes, seqs, 2, E)
    slots = 64
    lru = replay(steps, make_cache(spec, slots, 1))
    opt = belady(steps, slots, 1, spec.moe_layers)
    pc = replay(steps, make_cache(spec, slots, 1), load_predictor(model / "predictor", ckpt), ExpertFlowPlanner())
    assert opt.stats.misses <= lru.stats.misses and opt.bytes_moved <= pc.bytes_moved
    assert lru.uses == opt.uses == pc.uses and lru.tokens == n
    # LRU holds a layer-step's experts together (its groups fit the pool): the grouped bound is a floor for it too
    together = belady(steps, slots, 1, spec.moe_layers, grouped=True)
    assert opt.stats.misses <= together.stats.misses <= lru.stats.misses and together.uses == opt.uses


def test_grouped_belady_keeps_each_group_resident_together():
    from moeflow.experts.belady import belady_grouped_misses, belady_misses

    d, a, b, c = (1, 0), (0, 0), (0, 1), (0, 2)
    groups = [[d], [a, b, c], [d]]
    # one by one, c's load evicts a or b (never used again) just after its use and keeps d for the last group;
    # a group resident together has to evict d
    assert belady_misses([k for g in groups for k in g], 3) == 4
    assert belady_grouped_misses(groups, 3) == 5
    rng = np.random.default_rng(0)
    keys = [(int(l), int(e)) for l, e in rng.integers(0, 6, (300, 2))]
    assert belady_grouped_misses([[k] for k in keys], 8) == belady_misses(keys, 8), "groups of one: the same rule"
    # a group over the pool is taken in rounds, resident keys first: b and c stay from the first group, then a
    # alone evicts one of them
    assert belady_grouped_misses([[b, c], [a, b, c]], 2) == 3


def test_the_replay_hands_the_planner_the_traces_gate_ahead_counts_only_when_asked():
    model, ckpt, spec = tiny()
    rng = np.random.default_rng(1)
    n, L, E, K = 60, spec.num_moe_layers, spec.num_experts, spec.router.top_k
    routes = rng.random((n, L, E)).argsort(-1)[..., :K]  # K distinct experts per token and layer
    ahead = routes.copy()
    ahead[:, 0] = -1
    seqs = [slice(0, 30), slice(30, 60)]
    heard = []

    class Spy(ExpertFlowPlanner):
        def refine(self, cache, layer, used, scores, ahead=None):
            heard.append((layer, None if ahead is None else ahead.copy()))
            super().refine(cache, layer, used, scores, ahead)

    steps = decode_steps(rng.integers(1, 8000, n), routes.astype(np.int16), seqs, 2, E, ahead)
    pred = load_predictor(model / "predictor", ckpt)
    replay(steps, make_cache(spec, 64, 1), pred, Spy(), gate_ahead=True)
    first = steps[0].routes
    assert heard[0][0] == 0 and heard[0][1].sum() == 2 * K, "two rows' guesses for layer 1"
    assert np.array_equal(np.flatnonzero(heard[0][1]), np.unique(first.ahead_ids[1]))
    assert all(a is None for layer, a in heard if layer == L - 1), "the last layer has no next one"
    heard.clear()
    replay(steps, make_cache(spec, 64, 1), load_predictor(model / "predictor", ckpt), Spy())
    assert all(a is None for _, a in heard), "not asked: the planner hears none"
    bare = decode_steps(rng.integers(1, 8000, n), routes.astype(np.int16), seqs, 2, E)
    with pytest.raises(ValueError, match="no gate-ahead guesses"):
        replay(bare, make_cache(spec, 64, 1), load_predictor(model / "predictor", ckpt), Spy(), gate_ahead=True)
