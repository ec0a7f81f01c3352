"""The step loop: continuous batching, abort, stop conditions, sampling."""

from __future__ import annotations

import pytest

from helpers import greedy
from moeflow import LLM, SamplingParams
from moeflow.config import EngineConfig
from moeflow.engine.engine import LLMEngine
from moeflow.errors import RequestError

PROMPTS = [[0, 17, 201, 45, 99, 3], [0, 8, 9], [0, 100, 101, 102, 103, 104, 105, 106, 107], [0, 60]]


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return str(checkpoint("qwen3_moe", "per_expert"))


def alone(model_dir, prompt, params):
    llm = LLM(model_dir, device="cpu", dtype="float32", expert_budget="25%", max_model_len=128)
    return llm.generate([prompt], params)[0].outputs[0]


def test_sequences_join_while_others_decode_and_leave_when_done(model_dir):
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", max_model_len=128, max_num_seqs=3))
    lengths = [10, 4, 7, 6]
    engine.add_request("a", PROMPTS[0], greedy(lengths[0]))
    engine.add_request("b", PROMPTS[1], greedy(lengths[1]))
    done, running_sizes = {}, []
    for step in range(200):
        if step == 3:  # joins while a and b decode
            engine.add_request("c", PROMPTS[2], greedy(lengths[2]))
            engine.add_request("d", PROMPTS[3], greedy(lengths[3]))  # waits: only 3 KV rows
        outs = engine.step()
        running_sizes.append(engine.num_running)
        for o in outs:
            if o.finished:
                done[o.request_id] = o.outputs[0]
        if not engine.has_unfinished_requests() and step > 3:
            break
    assert set(done) == {"a", "b", "c", "d"}
    assert max(running_sizes) == 3, "never more sequences than KV rows (max_num_seqs)"
    for rid, prompt, n in zip("abcd", PROMPTS, lengths):
        assert done[rid].token_ids == alone(model_dir, prompt, greedy(n)).token_ids
        assert done[rid].finish_reason == "length"
    assert engine.kv.num_free == 3, "finished sequences give their KV rows back"


def test_abort_frees_the_sequence(model_dir):
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", max_model_len=128, max_num_seqs=2))
    engine.add_request("x", PROMPTS[0], greedy(50))
    engine.add_request("y", PROMPTS[1], greedy(3))
    engine.step()
    assert engine.abort_request("x") and not engine.abort_request("x")
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert all(o.request_id == "y" for o in outs)
    assert engine.kv.num_free == 2


def test_stop_token_ids_stop_strings_and_max_model_len(model_dir):
    base = alone(model_dir, PROMPTS[0], greedy(20))
    stop_tok = base.token_ids[5]
    out = alone(model_dir, PROMPTS[0], greedy(20, stop_token_ids=[stop_tok]))
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)

    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        out = alone(model_dir, PROMPTS[0], greedy(20, stop=[stop]))
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.index(stop)]

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=10)
    out = llm.generate([PROMPTS[0]], greedy(100))[0].outputs[0]
    assert out.finish_reason == "length" and len(PROMPTS[0]) + len(out.token_ids) == 10


def test_streamed_text_adds_up_to_the_final_text(model_dir):
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=128)
    pieces, last = [], None
    for out in llm.stream("the quick brown", greedy(15)):
        pieces.append(out.outputs[0].new_text)
        last = out
    assert last.finished and "".join(pieces) == last.outputs[0].text
    assert llm.last_stats.generated_tokens == 15


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model_dir):
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=128)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    b = llm.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    c = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    assert a == b
    assert c[0].outputs[0].token_ids != a
    k1 = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.7, top_k=1, seed=5, ignore_eos=True))
    assert k1[0].outputs[0].token_ids == llm.generate([PROMPTS[0]], greedy(12))[0].outputs[0].token_ids


def test_logprobs_are_reported_for_each_generated_token(model_dir):
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=128)
    out = llm.generate([PROMPTS[0]], greedy(5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) == 3  # greedy: the chosen token is among the top 3
        assert lp[tok] == max(lp.values()) <= 0.0


def test_generate_returns_stats(model_dir):
    llm = LLM(model_dir, device="cpu", dtype="float32", expert_budget="25%", max_model_len=128)
    out = llm.generate(PROMPTS, greedy(8))
    s = out.stats
    assert s.prompt_tokens == sum(map(len, PROMPTS)) and s.generated_tokens == 8 * len(PROMPTS)
    assert s.decode_tokens == 7 * len(PROMPTS)
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert s.cache.misses > 0 and s.cache.bytes_moved == s.cache.misses * llm.engine.cache.expert_bytes
    assert s.peak_device_memory_bytes >= llm.engine.cache.pool.numel() * 4


def test_resetting_the_cache_at_its_size_empties_it_in_place(model_dir):
    from moeflow.config import CacheConfig, ExpertBudget

    llm = LLM(model_dir, device="cpu", dtype="float32", expert_budget="25%", max_model_len=128)
    engine = llm.engine
    first = llm.generate(PROMPTS, greedy(6))
    cache = engine.cache
    engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("25%")))
    assert engine.cache is cache and (cache.slot_of == -1).all()
    again = llm.generate(PROMPTS, greedy(6))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert (again.stats.cache.hits, again.stats.cache.misses) == (first.stats.cache.hits, first.stats.cache.misses)
    engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("50%")))
    assert engine.cache is not cache and engine.cache.num_slots > cache.num_slots


def test_forced_output_decodes_the_given_tokens_and_scores_them(model_dir):
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", max_model_len=128, max_num_seqs=2))
    free = alone(model_dir, PROMPTS[0], greedy(6, logprobs=0))
    forced = [5, 9, 11, 3, 7]
    engine.add_request("f", PROMPTS[0], greedy(8, logprobs=0), forced_output=forced)
    engine.add_request("g", PROMPTS[1], greedy(4))
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0]
    out = done["f"]
    assert out.token_ids == forced and out.finish_reason == "length"
    assert [list(d) for d in out.logprobs] == [[t] for t in forced], "each step scores the forced token"
    # the first forced token is scored from the prompt alone: the same logits a free run starts from
    first = free.logprobs[0][free.token_ids[0]]
    assert out.logprobs[0][forced[0]] <= first + 1e-6
    with pytest.raises(RequestError, match="forced_output"):
        engine.add_request("h", PROMPTS[0], greedy(2), forced_output=[1, 2, 3])


def test_predictor_by_name_auto_or_directory():
    from moeflow.assets import default_model_dir
    from moeflow.experts.predictive import ExpertFlowPlanner
    from moeflow.routing.predictors import LearnedPredictor

    model = str(default_model_dir())
    llm = LLM(model, device="cpu", max_model_len=64, expert_budget="25%", predictor="auto")
    assert isinstance(llm.engine.predictor, LearnedPredictor), "the bundled model ships its predictor"
    assert isinstance(llm.engine.planner, ExpertFlowPlanner)
    assert LLM(model, device="cpu", max_model_len=64, predictor="frequency").engine.predictor.name == "frequency"
    with pytest.raises(Exception, match="neither a built-in"):
        LLM(model, device="cpu", max_model_len=64, predictor="/no/such/predictor")
