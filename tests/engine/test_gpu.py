"""The engine on CUDA: exactness, pinned host buffers, copies on their own stream, no per-expert syncs.

Run on a GPU machine with `pytest -m gpu`; skipped elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import FAMILIES, LAYOUTS
from helpers import LogitsRecorder, greedy, hf_greedy, relative_error
from moeflow import LLM, SamplingParams

pytestmark = pytest.mark.gpu
PROMPT = [0, 17, 201, 45, 99, 3, 150, 77, 12, 260, 31]
# logits closer than this are a tie under bfloat16 rounding (their values are of order 10; bfloat16 keeps ~3 digits)
BF16_TIE = 0.25


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def hf_on_cuda(model_dir, dtype):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_cuda_float32_matches_transformers(family, layout, budget, checkpoint):
    model_dir = checkpoint(family, layout)
    import transformers as tf

    # the reference runs on the CPU in float32: the strictest one there is
    ref_tokens, ref_logits = hf_greedy(tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                       PROMPT, 32)
    llm = LLM(str(model_dir), device="cuda", dtype="float32", expert_budget=budget, max_model_len=128)
    rec = LogitsRecorder(llm)
    out = llm.generate([PROMPT], greedy(32))
    assert out[0].outputs[0].token_ids == ref_tokens
    errors = [relative_error(a, b) for a, b in zip(rec.steps(), ref_logits)]
    assert max(errors) < 1e-4


def test_cuda_bfloat16_tokens_match_transformers_on_the_trained_model():
    """bfloat16 rounds differently in every implementation, so greedy paths may part where two tokens are
    nearly tied. Tokens must be identical up to the first parting, that parting must be a near tie in
    transformers' own logits (a wrong expert or weight moves logits by far more), and most tokens must agree."""
    from moeflow.assets import default_model_dir
    import transformers as tf

    model_dir = default_model_dir()
    hf = hf_on_cuda(model_dir, torch.bfloat16)
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", expert_budget="25%", max_model_len=512)
    # both stop at the model's end-of-text token, as a user's greedy request would
    eos = llm.tokenizer.eos_token_id
    cfg = tf.GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                              output_logits=True, return_dict_in_generate=True)
    agreed = compared = 0
    for text in ["The history of the city", "def fibonacci(n):", "ROMEO. What light", "La ville de Paris est"]:
        ids = llm.tokenizer.encode(text)
        t = torch.tensor([ids], device="cuda")
        out = hf.generate(t, attention_mask=torch.ones_like(t), generation_config=cfg)
        ref, ref_logits = out.sequences[0, len(ids):].tolist(), [l[0].float() for l in out.logits]
        ours = llm.generate([ids], SamplingParams(max_tokens=32, temperature=0.0))[0].outputs[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if same is None:
            assert ours == ref, text
            same = len(ref)
        else:
            gap = (ref_logits[same][ref[same]] - ref_logits[same][ours[same]]).item()
            assert gap < BF16_TIE, f"{text!r}, step {same}: tokens {ours[same]} and {ref[same]} are {gap:.3f} apart"
        agreed += same
        compared += len(ref)
    assert agreed >= compared // 2, f"only {agreed} of {compared} greedy tokens agree"


def test_host_store_is_pinned_and_expert_copies_run_on_their_own_stream(checkpoint, tmp_path):
    llm = LLM(str(checkpoint("qwen3_moe", "fused")), device="cuda", dtype="float32", expert_budget="25%",
              max_model_len=128)
    cache = llm.engine.cache
    assert cache.store.is_pinned and cache.store.get(cache.layers[0], 0).is_pinned()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = llm.generate([PROMPT, PROMPT[:4]], greedy(8))
    assert out.stats.cache.misses > 0
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernel_streams = {e["args"]["stream"] for e in events if e.get("cat") == "kernel"}
    h2d_streams = [e["args"]["stream"] for e in events
                   if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    copy_only = {s for s in h2d_streams if s not in kernel_streams}
    assert len(copy_only) == 1, "expert loads run on one stream that runs no kernels"
    assert h2d_streams.count(copy_only.pop()) == out.stats.cache.misses, "one copy per expert load"


def copy_streams(prof, tmp_path) -> dict[int, int]:
    """Host-to-device copies per stream, of the streams that run no kernel (the transfer engine's)."""
    trace = tmp_path / "copies.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernel_streams = {e["args"]["stream"] for e in events if e.get("cat") == "kernel"}
    out: dict[int, int] = {}
    for e in events:
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "") and e["args"]["stream"] not in kernel_streams:
            out[e["args"]["stream"]] = out.get(e["args"]["stream"], 0) + 1
    return out


def test_demand_misses_and_prefetches_copy_on_streams_of_their_own(tmp_path):
    """With the learned predictor, prefetches and demand misses copy on two streams (a miss never queues behind
    issued prefetches); one stream for both when asked, with the same tokens and the same copies."""
    from moeflow.assets import default_model_dir

    llm = LLM(str(default_model_dir()), device="cuda", dtype="float32", expert_budget="25%", max_model_len=256,
              max_batch_size=4, predictor="auto")
    prompts = ["The history of Paris", "def main():", "Once upon a time", "La ciudad de"]
    runs = {}
    for separate in (True, False):
        llm.engine.cache.transfer.separate_demand = separate
        llm.engine.reset_expert_cache(llm.engine.config.cache)  # emptied in place: the setting stays
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = llm.generate(prompts, greedy(16))
        c = out.stats.cache
        runs[separate] = ([o.outputs[0].token_ids for o in out], c.misses, c.prefetches, copy_streams(prof, tmp_path))
    (tokens, misses, prefetches, streams), (tokens1, misses1, prefetches1, streams1) = runs[True], runs[False]
    assert misses > 0 and prefetches > 0
    # (the counts of the two runs may differ: the predictor adapts online from the first run's routes)
    assert tokens1 == tokens
    assert len(streams) == 2 and min(streams.values()) > 0, streams
    assert sum(streams.values()) == misses + prefetches, "one copy per expert load"
    assert len(streams1) == 1 and sum(streams1.values()) == misses1 + prefetches1, (streams1, misses1, prefetches1)


@pytest.mark.parametrize("eager", [True, False])
def test_no_device_wide_synchronisation_per_expert(eager, checkpoint, monkeypatch):
    """The host waits for a router's choice (an event), never for the whole device or a whole stream."""
    llm = LLM(str(checkpoint("mixtral", "fused")), device="cuda", dtype="float32", expert_budget="1/layer",
              max_model_len=128, enforce_eager=eager)
    prompts = [PROMPT, PROMPT[:5], PROMPT[:2]]
    llm.generate(prompts, greedy(12))  # first steps of a shape capture graphs, which synchronises once
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("device"))
    original = torch.cuda.Stream.synchronize
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", lambda self: (calls.append("stream"), original(self)))
    out = llm.generate(prompts, greedy(12))
    assert out.stats.cache.misses > 20
    assert calls == []
    assert out.stats.cache.stall_s > 0, "the compute stream's waits on copies are timed with events"


@pytest.mark.parametrize("budget", ["100%", "25%", "1/layer"])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_cuda_graph_decode_equals_eager(family, budget, checkpoint):
    model_dir = str(checkpoint(family, "fused"))
    prompts = [PROMPT, PROMPT[:3], PROMPT[:7]]  # 3 sequences: padded to the batch bucket of 4
    runs = {}
    for eager in (True, False):
        llm = LLM(model_dir, device="cuda", dtype="float32", max_model_len=128, enforce_eager=eager,
                  expert_budget=budget)
        rec = LogitsRecorder(llm)
        runs[eager] = (llm, llm.generate(prompts, greedy(20)), rec)
    llm, out, rec = runs[False]
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.num_graphs > 0, "decode ran as graphs"
    assert runs[True][0].engine.runner.graphs is None
    for i in range(3):
        assert out[i].outputs[0].token_ids == runs[True][1][i].outputs[0].token_ids
        for a, b in zip(rec.steps(i), runs[True][2].steps(i)):
            assert relative_error(a, b) < 1e-5
    for field in ("hits", "misses", "bytes_moved"):
        assert getattr(out.stats.cache, field) == getattr(runs[True][1].stats.cache, field), field


def test_resetting_the_cache_at_its_size_keeps_the_captured_graphs(checkpoint):
    from moeflow.config import CacheConfig, ExpertBudget

    llm = LLM(str(checkpoint("qwen2_moe", "fused")), device="cuda", dtype="float32", max_model_len=128,
              expert_budget="25%")
    first = llm.generate([PROMPT, PROMPT[:5]], greedy(12))
    graphs = llm.engine.runner.graphs
    captured = graphs.num_graphs
    llm.engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse("25%")))
    again = llm.generate([PROMPT, PROMPT[:5]], greedy(12))
    assert llm.engine.runner.graphs is graphs and graphs.num_graphs == captured, "nothing was captured again"
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert (again.stats.cache.hits, again.stats.cache.misses) == (first.stats.cache.hits, first.stats.cache.misses)
