"""Outputs built while the next step runs (EngineConfig.overlap_output, on by default on CUDA): the same
requests give the same tokens, text, stream and finish as with outputs built at once, only a step later."""

from __future__ import annotations

import pytest

from moeflow import SamplingParams
from moeflow.assets import default_model_dir
from moeflow.config import EngineConfig
from moeflow.engine.engine import LLMEngine
from moeflow.errors import RequestError

PROMPTS = ["The history of the city", "def parse(text):", "Once upon a time", "La ciudad de", "To be, or"]


def engine(overlap: bool, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(default_model_dir()), device="cpu", dtype="float32", max_model_len=256,
                                  max_num_seqs=kwargs.pop("max_num_seqs", 4), overlap_output=overlap, **kwargs))


def params() -> list[SamplingParams]:
    """A mix that ends every way a request can: length, a stop string, a stop token, EOS; greedy and sampled,
    with logprobs."""
    return [
        SamplingParams(max_tokens=24, temperature=0.0),
        SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=3, stop=[" the", "\n"]),
        SamplingParams(max_tokens=30, temperature=1.0, seed=5, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.7, seed=9, stop_token_ids=[13, 30]),
        SamplingParams(max_tokens=3, temperature=0.0, include_stop_str_in_output=True, stop=["e"]),
    ]


def drive(eng: LLMEngine) -> tuple[dict, dict, list[int]]:
    """Run every prompt to its end; per request its final output and its streamed text, and the number of
    outputs each step call returned."""
    for i, (prompt, p) in enumerate(zip(PROMPTS, params())):
        eng.add_request(str(i), prompt, p)
    final, streamed, per_call = {}, {}, []
    for _ in range(500):
        if not eng.has_unfinished_requests():
            break
        outs = eng.step()
        per_call.append(len(outs))
        for o in outs:
            assert o.request_id not in final, "an output after the request's final one"
            streamed[o.request_id] = streamed.get(o.request_id, "") + o.outputs[0].new_text
            if o.finished:
                final[o.request_id] = o
    return final, streamed, per_call


def test_overlapped_outputs_equal_immediate_ones_a_step_later():
    now, now_stream, now_calls = drive(engine(False))
    late, late_stream, late_calls = drive(engine(True))
    assert set(now) == set(late) == {str(i) for i in range(len(PROMPTS))}
    reasons = set()
    for rid, a in now.items():
        b = late[rid]
        ca, cb = a.outputs[0], b.outputs[0]
        assert (cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason) == \
               (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason), rid
        assert cb.logprobs == ca.logprobs and b.prompt_logprobs == a.prompt_logprobs
        assert late_stream[rid] == now_stream[rid] == ca.text
        reasons.add((ca.finish_reason, ca.stop_reason is None))
    assert len(reasons) >= 2  # the mix did end in more than one way
    # the same outputs in all, each call returning what the call before it would have
    assert sum(late_calls) == sum(now_calls)
    assert late_calls[0] == 0 and late_calls[1:len(now_calls) + 1] == now_calls


def test_abort_between_a_step_and_its_outputs_drops_them():
    eng = engine(True)
    eng.add_request("a", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0))  # ends at its prefill
    eng.add_request("b", PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.0))
    assert eng.step() == []  # the prefill ran; its outputs are built during the next step
    assert eng.has_unfinished_requests() and eng.num_running == 1  # a has left, b decodes
    assert eng.abort_request("a") and eng.abort_request("b")
    assert not eng.abort_request("a")
    assert eng.step() == [] and not eng.has_unfinished_requests()
    assert eng.kv.num_free == 4


def test_last_outputs_come_from_a_call_with_nothing_to_run():
    eng = engine(True)
    eng.add_request("a", PROMPTS[2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert eng.step() == []
    first = eng.step()  # the decode step ran; the prefill's token comes out
    assert [len(o.outputs[0].token_ids) for o in first] == [1] and not first[0].finished
    assert eng.has_unfinished_requests() and eng.num_running == 0  # finished, its last output to come
    last = eng.step()
    assert [o.finished for o in last] == [True] and len(last[0].outputs[0].token_ids) == 2
    assert not eng.has_unfinished_requests() and eng.step() == []


def test_the_switch_waits_for_the_last_output():
    eng = engine(False)
    assert not eng.overlap_output
    eng.overlap_output = True  # (as `bench offline` switches it between runs)
    eng.add_request("a", PROMPTS[3], SamplingParams(max_tokens=1, temperature=0.0))
    assert eng.step() == []
    with pytest.raises(RequestError, match="overlap_output"):  # a's output is still to come
        eng.overlap_output = False
    assert [o.finished for o in eng.step()] == [True]
    eng.overlap_output = None  # the engine's default: off on the CPU
    assert eng.overlap_output is False


@pytest.mark.parametrize("overlap", [False, True])
def test_default_is_off_on_the_cpu_unless_asked(overlap):
    assert engine(None).overlap_output is False
    assert engine(overlap).overlap_output is overlap


def test_llm_and_cli_pass_it_on():
    from moeflow.cli import build_parser
    from moeflow.commands.common import engine_kwargs

    assert [engine_kwargs(build_parser().parse_args(["generate", "--prompt", "hi", *flag]))["overlap_output"]
            for flag in ([], ["--overlap-output"], ["--no-overlap-output"])] == [None, True, False]
    from moeflow import LLM

    llm = LLM(str(default_model_dir()), device="cpu", max_model_len=64, overlap_output=True)
    assert llm.engine.overlap_output is True
    out = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [5, 5]


def test_teacher_forced_scores_are_the_same_a_step_later():
    """`eval perplexity` (teacher forcing, logprobs of forced tokens, LYNX beside exact) runs overlapped on CUDA."""
    from moeflow.evaluation.documents import load_documents
    from moeflow.evaluation.forcing import make_engine
    from moeflow.evaluation.perplexity import document_sequences, evaluate_perplexity
    from moeflow.routing.lynx import AffinityBinning

    scores = []
    for overlap in (False, True):
        eng = make_engine(default_model_dir(), 8, 48, device="cpu", dtype="float32")
        eng.overlap_output = overlap
        eng.set_selector(AffinityBinning.for_spec(eng.spec))
        seqs = document_sequences(eng.tokenizer, load_documents(["tests/data/heldout"], max_docs=12), 48)
        runs = evaluate_perplexity(eng, seqs, ["lynx"])
        scores.append({mode: (r.tokens, r.perplexity, r.agreement_top1, r.stats.distinct_experts_per_layer_step)
                       for mode, r in runs.items()})
    assert scores[0] == scores[1] and scores[0]["exact"][0] > 300


@pytest.mark.gpu
@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_cuda_graphs_overlapped_give_the_same_outputs(budget):
    """On CUDA, decode graphs replayed, every expert resident or a quarter of them: outputs built while the next
    step runs equal those built at once, LYNX requests beside exact ones."""
    import torch

    from moeflow import LLM

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    runs = []
    for overlap in (False, True):
        llm = LLM(str(default_model_dir()), device="cuda", expert_budget=budget, max_num_seqs=8, max_model_len=256,
                  overlap_output=overlap)
        assert llm.engine.runner.graphs is not None
        ps = [SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=i, logprobs=1,
                             routing="lynx" if i % 2 else "exact", stop=["\n\n"] if i == 3 else []) for i in range(8)]
        outs = llm.generate((PROMPTS * 2)[:8], ps)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].logprobs)
                     for o in outs])
        del llm
        torch.cuda.empty_cache()
    assert runs[0] == runs[1]
