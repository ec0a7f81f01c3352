"""Steps launched before the last one is settled (EngineConfig.async_scheduling): the next step's input tokens
stay on the device, and the host takes a step's tokens while the step after it runs. The same requests give the
same tokens, text and finish as with every step settled before the next is planned."""

from __future__ import annotations

import logging

import pytest

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.bench import axes
from moeflow.config import CacheConfig, EngineConfig, ExpertBudget
from moeflow.engine.engine import LLMEngine
from moeflow.errors import ConfigError, RequestError

PROMPTS = ["The history of the city", "def parse(text):", "Once upon a time", "La ciudad de", "To be, or",
           "In the year", "import numpy as", "Il était une fois"]


def engine(run_ahead: bool, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(default_model_dir()), device="cpu", dtype="float32", max_model_len=256,
                                  max_num_seqs=kwargs.pop("max_num_seqs", 4), async_scheduling=run_ahead, **kwargs))


def drive(eng: LLMEngine, requests: list[tuple[str, SamplingParams]], forced: dict | None = None
          ) -> tuple[dict, dict, float]:
    """Run the requests to their end: per request its final output and its streamed text, and the share of the
    calls that left a step in flight. Sets `eng.rows_run`: the decode rows its steps ran."""
    eng.rows_run = 0

    def count(view, routes):
        eng.rows_run += 0 if view.is_prefill else len(view.request_ids)

    eng.add_route_listener(count)
    for i, (prompt, p) in enumerate(requests):
        eng.add_request(str(i), prompt, p, forced_output=(forced or {}).get(i))
    final, streamed, ahead, calls = {}, {}, 0, 0
    for calls in range(1, 1000):
        if not eng.has_unfinished_requests():
            break
        for o in eng.step():
            assert o.request_id not in final, "an output after the request's final one"
            streamed[o.request_id] = streamed.get(o.request_id, "") + o.outputs[0].new_text
            if o.finished:
                final[o.request_id] = o
        ahead += eng.in_flight is not None
    assert not eng.has_unfinished_requests() and eng.kv.num_free == eng.kv.rows
    return final, streamed, ahead / calls


def same(a: dict, b: dict) -> set:
    """Assert two runs' final outputs are equal; the ways they ended."""
    assert set(a) == set(b)
    for rid, x in a.items():
        ca, cb = x.outputs[0], b[rid].outputs[0]
        assert (cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason) == \
               (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason), rid
        assert cb.logprobs == ca.logprobs and b[rid].prompt_logprobs == x.prompt_logprobs
    return {(x.outputs[0].finish_reason, x.outputs[0].stop_reason is None) for x in a.values()}


def mix(stop_tokens: dict[int, int]) -> list[tuple[str, SamplingParams]]:
    """Greedy and seeded sampling, penalties, stop strings, and stop tokens that end requests mid-run (a token
    each of them takes there, from a first run)."""
    def p(i: int, **kw) -> SamplingParams:
        return SamplingParams(stop_token_ids=[stop_tokens[i]] if i in stop_tokens else [], **kw)

    return [
        (PROMPTS[0], p(0, max_tokens=24, temperature=0.0)),
        (PROMPTS[1], p(1, max_tokens=40, temperature=0.8, top_p=0.95, seed=3, stop=[" the", "\n"])),
        (PROMPTS[2], p(2, max_tokens=30, temperature=1.0, seed=5, repetition_penalty=1.3, presence_penalty=0.5)),
        (PROMPTS[3], p(3, max_tokens=12, temperature=0.7, seed=9)),
        (PROMPTS[4], p(4, max_tokens=1, temperature=0.0)),  # ends at its prefill
        (PROMPTS[5], p(5, max_tokens=17, temperature=0.9, top_k=20, seed=11, frequency_penalty=0.4)),
        (PROMPTS[6], p(6, max_tokens=2, temperature=0.0)),
        (PROMPTS[7], p(7, max_tokens=20, temperature=0.6, seed=13, min_p=0.05)),
    ]


def stop_tokens_mid_run(eng: LLMEngine | None = None) -> dict[int, int]:
    """For some requests, a token they take a few tokens in (with no stop tokens; on `eng`, default a CPU
    engine), so that as a stop token it ends them there, a step the host cannot foresee."""
    first, _, _ = drive(eng if eng is not None else engine(False), mix({}))
    out = {}
    for i in (0, 2, 5, 7):
        ids = first[str(i)].outputs[0].token_ids
        at = next(k for k in range(3, len(ids)) if ids[k] not in ids[:k])  # its first time: the stop lands here
        out[i] = ids[at]
    return out


@pytest.mark.parametrize("batch", [4, 2])
def test_steps_launched_ahead_give_the_same_outputs(batch):
    """Eight requests over four KV rows (admitted as rows free up), decode steps of `batch` of the running
    sequences; requests end by length, at their prefill, by stop strings and by stop tokens the host learns a
    step late."""
    requests = mix(stop_tokens_mid_run())
    settled, settled_stream, none_ahead = drive(engine(False, max_batch_size=batch), requests)
    ahead_eng = engine(True, max_batch_size=batch)
    early, early_stream, ahead = drive(ahead_eng, requests)
    reasons = same(settled, early)
    assert ("stop", False) in reasons and ("length", True) in reasons  # stop tokens did end requests mid-run
    assert early_stream == settled_stream
    assert none_ahead == 0 and ahead >= 0.8  # most calls left a step in flight
    # a sequence ended by a token the host had not taken yet ran one step more, whose token is void and not
    # counted: the tokens generated are the outputs' own
    total = sum(len(o.outputs[0].token_ids) for o in early.values())
    assert ahead_eng.counters["generated_tokens"] == total
    prefilled = len(requests)  # (each request's first token comes from its prefill)
    assert ahead_eng.rows_run > total - prefilled


@pytest.mark.parametrize("overlap", [False, True])
def test_outputs_settled_early_are_not_lost_when_a_prefill_is_launched_ahead(overlap):
    """Every running sequence ends by length in the step in flight, with requests waiting and no row free: the
    engine settles that step before planning (nothing left to decode), which frees the rows, and then launches the
    waiting requests' prefill ahead. The ended sequences' final outputs must still come out (a server's clients
    waited for them forever: the next settle overwrote them before they were emitted)."""
    eng = engine(True, overlap_output=overlap)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i in range(4):  # one prefill step admits all four; they end by length at the same step
        eng.add_request(str(i), PROMPTS[i], params)
    eng.step()
    for i in range(4, 6):  # waiting, no row free
        eng.add_request(str(i), PROMPTS[i], params)
    finished = set()
    for _ in range(100):
        if not eng.has_unfinished_requests():
            break
        finished |= {o.request_id for o in eng.step() if o.finished}
    assert finished == {str(i) for i in range(6)}
    assert not eng._seqs and eng.kv.num_free == eng.kv.rows


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_with_logprobs_settles_its_steps(overlap):
    """Logprobs are read from a step's logits, which the next step overwrites: such steps are settled at once,
    and the rest still run ahead. With outputs built during the next step (overlap_output, CUDA's default), a
    step settled at once leaves its outputs to the next call, which may launch a step ahead: they come out all
    the same, streamed as the settled engine streams them."""
    requests = [(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)),
                (PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.8, seed=4, ignore_eos=True)),
                (PROMPTS[2], SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1))]
    settled, settled_streams, _ = drive(engine(False, overlap_output=overlap), requests)
    early, early_streams, ahead = drive(engine(True, overlap_output=overlap), requests)
    same(settled, early)
    assert early_streams == settled_streams
    assert len(early["0"].outputs[0].logprobs) == 6 and early["2"].prompt_logprobs is not None
    assert 0.2 <= ahead < 0.9  # once the logprobs requests had ended


def test_teacher_forcing_and_lynx_requests_run_ahead_the_same():
    """Forced tokens are known to the host; LYNX's choice depends on the batch, which is the same when no
    request ends before the host knows it (every request here ends by length)."""
    requests = [(PROMPTS[i], SamplingParams(max_tokens=8 + i, temperature=0.0, ignore_eos=True,
                                            routing="lynx" if i % 2 else "exact")) for i in range(4)]
    forced = {0: [5, 6, 7, 8, 9, 10, 11, 12], 3: [40] * 11}
    settled, _, _ = drive(engine(False), requests, forced)
    eng = engine(True)
    early, _, ahead = drive(eng, requests, forced)
    same(settled, early)
    assert early["0"].outputs[0].token_ids == forced[0] and ahead >= 0.8
    assert eng.rows_run == 7 + 8 + 9 + 10  # a sequence its step in flight ends by length is not scheduled again


def test_abort_while_its_step_is_in_flight():
    eng = engine(True)
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eng.add_request("a", PROMPTS[0], p)
    eng.add_request("b", PROMPTS[1], p)
    outs = []
    while eng.in_flight is None or eng.in_flight.is_prefill:
        outs += eng.step()
    assert eng.abort_request("a")  # its token in flight is dropped, its KV row given back
    assert eng.kv.num_free == 3
    after = []
    while eng.has_unfinished_requests():
        after += eng.step()
    assert {o.request_id for o in after} == {"b"} and after[-1].finished
    alone, _, _ = drive(engine(False), [(PROMPTS[1], p)])
    assert after[-1].outputs[0].token_ids == alone["0"].outputs[0].token_ids
    assert eng.kv.num_free == 4


@pytest.mark.parametrize("kind", ["offloaded", "route-aware", "predictor"])
def test_steps_whose_planning_reads_routes_are_settled_first(kind, caplog):
    """An offloaded pool plans its copies, a predictor forecasts and route-aware scheduling chooses from the last
    step's routes: those engines settle every step before planning the next, and give the same tokens."""
    kwargs = {"offloaded": {"cache": CacheConfig(budget=ExpertBudget.parse("25%"))},
              "route-aware": {"scheduler": "route-aware"}, "predictor": {"predictor": "frequency"}}[kind]
    requests = [(PROMPTS[i], SamplingParams(max_tokens=8, temperature=0.7, seed=i)) for i in range(3)]
    settled, _, _ = drive(engine(False, **kwargs), requests)
    with caplog.at_level(logging.WARNING, logger="moeflow.engine"):
        eng = engine(True, **kwargs)
    assert "async_scheduling has no effect" in caplog.text and eng.async_blocker() is not None
    early, _, ahead = drive(eng, requests)
    same(settled, early)
    assert ahead == 0


def test_the_switch_waits_for_the_step_in_flight():
    eng = engine(False)
    eng.async_scheduling = True  # (as `bench offline` switches it between runs)
    eng.add_request("a", PROMPTS[3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    eng.step()
    assert eng.in_flight is not None
    with pytest.raises(RequestError, match="async_scheduling"):
        eng.async_scheduling = False
    while eng.has_unfinished_requests():
        eng.step()
    eng.async_scheduling = None  # the engine's default: off on the CPU
    assert eng.async_scheduling is False


def test_llm_cli_and_bench_plumbing():
    from moeflow.cli import build_parser
    from moeflow.commands.common import engine_kwargs

    assert [engine_kwargs(build_parser().parse_args(["generate", "--prompt", "hi", *flag]))["async_scheduling"]
            for flag in ([], ["--async-scheduling"], ["--no-async-scheduling"])] == [None, True, False]
    llm = LLM(str(default_model_dir()), device="cpu", max_model_len=64, async_scheduling=True)
    assert llm.engine.async_scheduling is True
    out = llm.generate(["The history of"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    assert [axes.scheduling_switch(t, "async") for t in ("fcfs", "fcfs:async=0", "fcfs:overlap=1:async=1")] == \
           [None, False, True]
    with pytest.raises(ConfigError, match="async=0|1"):
        axes.scheduling_switch("fcfs:async=2", "async")


def test_the_default_is_on_cuda_only_and_silent_where_it_cannot_apply(caplog):
    """Unasked, async scheduling is on where a device runs a step while the host plans the next (CUDA), off on the
    CPU; an engine it cannot apply to (here a predictor) says nothing unless it was asked for."""
    import torch

    from moeflow.engine.setup import resolve_overlap

    assert [resolve_overlap(a, torch.device(d)) for a in (None, True, False) for d in ("cuda", "cpu")] == \
           [True, False, True, True, False, False]
    with caplog.at_level(logging.WARNING, logger="moeflow.engine"):
        eng = LLMEngine(EngineConfig(model=str(default_model_dir()), device="cpu", max_model_len=64,
                                     predictor="frequency"))
    assert eng.async_scheduling is False and eng.async_blocker() is not None
    assert "async_scheduling" not in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["exact", "mixed"])
def test_cuda_graphs_launched_ahead_give_the_same_outputs(routing):
    """On CUDA, decode graphs replayed, every expert resident: steps launched before the last is settled give
    the outputs of settled steps. Exact requests end by stop tokens mid-run too; with LYNX requests beside them
    every request ends by length, so that the batches (which LYNX's choice depends on) are the same."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    def make(run_ahead: bool | None) -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(default_model_dir()), device="cuda", max_model_len=256,
                                      max_num_seqs=8, max_batch_size=4, async_scheduling=run_ahead))

    assert make(None).async_scheduling, "on by default on CUDA"

    if routing == "exact":
        requests = mix(stop_tokens_mid_run(make(False)))
    else:
        requests = [(p, SamplingParams(max_tokens=24 + i, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True,
                                       routing="lynx" if i % 2 else "exact")) for i, p in enumerate(PROMPTS)]
    runs = []
    for run_ahead in (False, True):
        eng = make(run_ahead)
        assert eng.runner.graphs is not None
        final, streamed, ahead = drive(eng, requests)
        runs.append((final, streamed, ahead))
        del eng
        torch.cuda.empty_cache()
    same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == 0 and runs[1][2] >= 0.8
