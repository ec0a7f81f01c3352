"""ExpertFlowPlanner in the engine: whatever part is on, the tokens are the model's own (CPU, and on CUDA under
graphs), and the engine takes the planner's rounds by value from its configuration."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.routing.predictors import Prediction, load_predictor
from moeflow.weights.checkpoint import Checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Scripted:
    """Predicts a fixed, partly wrong set of experts for every layer (no refine)."""

    name = "scripted"

    def __init__(self, spec):
        self.rng = np.random.default_rng(0)
        self.shape = (spec.num_moe_layers, spec.num_experts)

    def admitted(self, request):
        pass

    def finished(self, request_id):
        pass

    def predict(self, step):
        return Prediction(self.rng.random(self.shape))

    def observe(self, step, routes):
        pass


PARTS = ("quotas", "protect", "prefetch", "correct")
PROMPTS = [[0, 464, 3290, 318, 262], [0, 1000, 7, 88], [0, 4000]]


def greedy_tokens(llm: LLM) -> list[list[int]]:
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in out]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return greedy_tokens(LLM(str(default_model_dir()), device="cpu", max_model_len=64))


@pytest.mark.parametrize("budget,off", [("1/layer", None), ("10%", None), ("25%", None), ("50%", None),
                                        ("100%", None), ("1/layer", "adapt"), ("10%", "cross_step"),
                                        ("25%", "cross_step"), ("10%", "gate_ahead"), ("25%", "gate_ahead"),
                                        ("10%", "rounds"), ("25%", "rounds")]
                         + [(b, p) for b in ("25%", "1/layer") for p in PARTS])
def test_tokens_are_the_same_with_the_learned_predictor(budget, off, reference):
    """`off` names the part switched off ("cross_step", "gate_ahead", "rounds": ones that are off by default,
    switched on)."""
    llm = LLM(str(default_model_dir()), device="cpu", max_model_len=64, expert_budget=budget,
              gate_ahead=off == "gate_ahead")
    engine = llm.engine
    pred = load_predictor(default_model_dir() / "predictor", Checkpoint(default_model_dir()), adapt=off != "adapt")
    engine.set_predictor(pred)
    engine.planner = ExpertFlowPlanner(**{p: p != off for p in PARTS}, cross_step=off == "cross_step",
                                       rounds=int(off == "rounds"))
    acquires = []
    acquire = engine.cache.acquire
    engine.cache.acquire = lambda layer, experts: (acquires.append(layer), acquire(layer, experts))[1]
    heard = []
    refine = engine.planner.refine
    engine.planner.refine = lambda *a, ahead=None: (heard.append(ahead is not None), refine(*a, ahead=ahead))
    assert greedy_tokens(llm) == reference
    assert any(heard) == (off == "gate_ahead"), "the planner hears the gate ahead exactly when it is on"
    if off == "rounds":  # some layer was computed in more than one round: the same layer acquired twice running
        assert any(a == b for a, b in zip(acquires, acquires[1:]))
    if budget not in ("100%",) and off != "prefetch":
        assert llm.last_stats.cache.prefetches > 0


def test_a_scripted_wrong_predictor_leaves_the_tokens_alone_too(reference):
    llm = LLM(str(default_model_dir()), device="cpu", max_model_len=64, expert_budget="10%")
    llm.engine.set_predictor(Scripted(llm.engine.spec))
    llm.engine.planner = ExpertFlowPlanner()
    assert greedy_tokens(llm) == reference


@pytest.fixture(scope="module")
def gpu_reference() -> list[list[int]]:
    return greedy_tokens(LLM(str(default_model_dir()), device="cuda", max_model_len=64))


@pytest.mark.gpu
@pytest.mark.parametrize("budget", ["1/layer", "10%", "25%", "50%", "100%"])
@pytest.mark.parametrize("off", [None, *PARTS, "adapt", "cross_step", "gate_ahead"])
def test_gpu_tokens_are_the_same_with_the_learned_predictor_and_graphs(budget, off, gpu_reference):
    llm = LLM(str(default_model_dir()), device="cuda", max_model_len=64, expert_budget=budget,
              gate_ahead=off == "gate_ahead")
    assert llm.engine.runner.graphs is not None, "decode runs as CUDA graphs"
    pred = load_predictor(default_model_dir() / "predictor", llm.engine.checkpoint, llm.engine.device,
                          adapt=off != "adapt")
    llm.engine.set_predictor(pred)
    llm.engine.planner = ExpertFlowPlanner(**{p: p != off for p in PARTS}, cross_step=off == "cross_step")
    assert greedy_tokens(llm) == gpu_reference
    if budget != "100%" and off != "prefetch":
        assert llm.last_stats.cache.prefetches > 0


@pytest.mark.gpu
@pytest.mark.parametrize("budget", ["1/layer", "10%", "25%"])
@pytest.mark.parametrize("rounds", [1, 8])
def test_gpu_rounds_by_value_leave_the_tokens_alone_under_graphs(budget, rounds, gpu_reference):
    """Rounds by value evict what a layer computed earlier in the same step: every slot a round reads must stay
    marked until the GPU is done with it, or a later round refills it under the running kernel (which changed the
    bench model's tokens on an H100 before c474cba)."""
    llm = LLM(str(default_model_dir()), device="cuda", max_model_len=64, expert_budget=budget)
    assert llm.engine.runner.graphs is not None, "decode runs as CUDA graphs"
    pred = load_predictor(default_model_dir() / "predictor", llm.engine.checkpoint, llm.engine.device)
    llm.engine.set_predictor(pred, ExpertFlowPlanner(rounds=rounds))
    acquires = []
    acquire = llm.engine.cache.acquire
    llm.engine.cache.acquire = lambda layer, experts: (acquires.append(layer), acquire(layer, experts))[1]
    assert greedy_tokens(llm) == gpu_reference
    assert any(a == b for a, b in zip(acquires, acquires[1:])), "some layer was computed in more than one round"


def loose_margin_tokens(device: str, budget: str) -> tuple[list[list[int]], LLM]:
    """Greedy tokens with --prefetch-margin 1 and --expert-rounds 8 (how route-aware would serve with them), and the
    LLM, its prefetch counts in last_stats."""
    llm = LLM(str(default_model_dir()), device=device, max_model_len=64, expert_budget=budget, predictor="auto",
              expert_rounds=8, prefetch_margin=1.0)
    assert llm.engine.planner.prefetch_margin == 1.0 and llm.engine.planner.rounds == 8
    return greedy_tokens(llm), llm


@pytest.mark.parametrize("budget", ["10%", "25%"])
def test_a_loose_prefetch_margin_leaves_the_tokens_alone(budget, reference):
    """A prefetch then evicts what the default margin keeps (the experts of layers that have routed): more copies
    in flight while layers compute, none of them changing a token."""
    tokens, llm = loose_margin_tokens("cpu", budget)
    assert tokens == reference
    assert llm.last_stats.cache.prefetches > 0


@pytest.mark.gpu
@pytest.mark.parametrize("budget", ["1/layer", "10%", "25%"])
def test_gpu_a_loose_prefetch_margin_leaves_the_tokens_alone_under_graphs(budget, gpu_reference):
    """The same under CUDA graphs, where a prefetch's copy must land before a replayed graph reads its slot."""
    tokens, llm = loose_margin_tokens("cuda", budget)
    assert llm.engine.runner.graphs is not None, "decode runs as CUDA graphs"
    assert tokens == gpu_reference
    assert llm.last_stats.cache.prefetches > 0


@pytest.mark.gpu
def test_gpu_the_gate_ahead_the_planner_hears_is_the_same_from_graphs_and_eager():
    """Replayed decode graphs publish the gate ahead's counts with each layer's experts (one copy, one wait);
    eager steps read them from the device: the planner must hear the same either way (float32, so that no
    near tie in the guesses can flip between the two)."""
    heard = {}
    for eager in (False, True):
        llm = LLM(str(default_model_dir()), device="cuda", dtype="float32", max_model_len=64, expert_budget="25%",
                  gate_ahead=True, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        llm.engine.set_predictor(load_predictor(default_model_dir() / "predictor", llm.engine.checkpoint,
                                                llm.engine.device))
        planner = llm.engine.planner = ExpertFlowPlanner()
        got = heard[eager] = []
        refine = planner.refine
        planner.refine = lambda cache, layer, used, scores, ahead=None: (
            got.append((layer, None if ahead is None else ahead.tolist())), refine(cache, layer, used, scores, ahead))
        greedy_tokens(llm)
    assert heard[False] == heard[True]
    assert sum(a is not None and sum(a) > 0 for _, a in heard[False]) > 10


def test_planner_options_are_set_from_llm_and_the_cli_and_refused_without_the_predictive_cache():
    from moeflow.cli import build_parser
    from moeflow.commands.common import engine_kwargs
    from moeflow.errors import ConfigError

    def llm(**kw):
        return LLM(str(default_model_dir()), device="cpu", max_model_len=32, expert_budget="25%", **kw)

    assert llm(predictor="auto", expert_rounds=8).engine.planner.rounds == 8
    assert llm(predictor="auto").engine.planner.rounds == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="expert_rounds must be an integer >= 0"):
            llm(predictor="auto", expert_rounds=bad)
    with pytest.raises(ConfigError, match="expert_rounds=8 needs the predictive cache.*it has no predictor"):
        llm(expert_rounds=8)
    with pytest.raises(ConfigError, match="needs the predictive cache.*its predictor is FrequencyPredictor"):
        llm(predictor="frequency", expert_rounds=8)
    args = build_parser().parse_args(["serve", "--predictor", "auto", "--expert-rounds", "8"])
    assert engine_kwargs(args)["expert_rounds"] == 8
    assert engine_kwargs(build_parser().parse_args(["generate", "--prompt", "hi"]))["expert_rounds"] == 0
    # the prefetch margin: the planner's own (0.25) unless set
    assert llm(predictor="auto", prefetch_margin=1).engine.planner.prefetch_margin == 1
    assert llm(predictor="auto").engine.planner.prefetch_margin == 0.25
    for bad in (-0.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="prefetch_margin must be a finite number >= 0"):
            llm(predictor="auto", prefetch_margin=bad)
    with pytest.raises(ConfigError, match="^prefetch_margin=1.0 needs the predictive cache.*it has no predictor"):
        llm(prefetch_margin=1.0)
    with pytest.raises(ConfigError, match="^expert_rounds=8 and prefetch_margin=0.5 need the predictive cache.*"
                                          "its predictor is FrequencyPredictor"):
        llm(predictor="frequency", expert_rounds=8, prefetch_margin=0.5)
    args = build_parser().parse_args(["serve", "--predictor", "auto", "--prefetch-margin", "1"])
    assert engine_kwargs(args)["prefetch_margin"] == 1.0
    assert engine_kwargs(build_parser().parse_args(["generate", "--prompt", "hi"]))["prefetch_margin"] is None
