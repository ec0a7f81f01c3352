"""Exact mode: moeflow produces what transformers' own implementation produces, at every budget."""

from __future__ import annotations

import pytest
import torch

from checkpoints import FAMILIES, LAYOUTS
from helpers import LogitsRecorder, greedy, hf_greedy, relative_error
from moeflow import LLM

STEPS = 32
PROMPT = [0, 17, 201, 45, 99, 3, 150, 77, 12, 260, 31]


@pytest.fixture(scope="module")
def hf_models(checkpoint):
    import transformers as tf

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tf.AutoModelForCausalLM.from_pretrained(checkpoint(family), dtype=torch.float32).eval()
        return cache[family]

    return get


def run_moeflow(model_dir, budget="100%", prompts=(PROMPT,), steps=STEPS, **kw):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", expert_budget=budget, max_model_len=128, **kw)
    rec = LogitsRecorder(llm)
    out = llm.generate([list(p) for p in prompts], greedy(steps))
    return llm, out, rec


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_tokens_match_transformers(family, layout, checkpoint, hf_models):
    ref_tokens, ref_logits = hf_greedy(hf_models(family), PROMPT, STEPS)
    _, out, rec = run_moeflow(checkpoint(family, layout))
    assert out[0].outputs[0].token_ids == ref_tokens
    ours = rec.steps()
    assert len(ours) == STEPS
    errors = [relative_error(a, b) for a, b in zip(ours, ref_logits)]
    assert max(errors) < 1e-4, f"step {errors.index(max(errors))}: relative error {max(errors):.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers_at_every_position(family, checkpoint, hf_models):
    """Prompt logprobs cover every prefill position, not only the last one."""
    from moeflow import SamplingParams

    llm = LLM(str(checkpoint(family, "fused")), device="cpu", dtype="float32", max_model_len=128)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    with torch.no_grad():
        ref = torch.log_softmax(hf_models(family)(torch.tensor([PROMPT])).logits[0].float(), -1)
    ours = out[0].prompt_logprobs
    assert ours[0] is None
    for pos in range(1, len(PROMPT)):
        assert ours[pos][PROMPT[pos]] == pytest.approx(ref[pos - 1, PROMPT[pos]].item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_output_at_every_expert_budget(family, checkpoint):
    runs = {b: run_moeflow(checkpoint(family, "fused"), budget=b) for b in ("100%", "25%", "1/layer")}
    tokens = {b: out[0].outputs[0].token_ids for b, (_, out, _) in runs.items()}
    assert tokens["25%"] == tokens["100%"] and tokens["1/layer"] == tokens["100%"]
    for b in ("25%", "1/layer"):
        for a, ref in zip(runs[b][2].steps(), runs["100%"][2].steps()):
            assert torch.equal(a, ref), "rows are summed in pick order, so every budget gives bitwise the same logits"
    # counters add up: every step touches the same experts whatever the budget
    accesses = {b: out.stats.cache.hits + out.stats.cache.misses for b, (_, out, _) in runs.items()}
    assert accesses["25%"] == accesses["100%"] == accesses["1/layer"]
    for b, (llm, out, _) in runs.items():
        c = out.stats.cache
        assert c.bytes_moved == c.misses * llm.engine.cache.expert_bytes
        assert sum(s.misses for s in out.stats.per_layer.values()) == c.misses
    assert runs["100%"][1].stats.cache.misses == 0
    assert runs["1/layer"][1].stats.cache.misses > runs["25%"][1].stats.cache.misses > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_mixed_lengths_equals_each_prompt_alone(family, checkpoint):
    prompts = [PROMPT, PROMPT[:3], [0, 5, 9, 250, 251, 252, 8, 2, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53], [0, 7]]
    _, batched, rec = run_moeflow(checkpoint(family, "per_expert"), budget="25%", prompts=prompts, steps=12)
    for i, prompt in enumerate(prompts):
        _, alone, rec_alone = run_moeflow(checkpoint(family, "per_expert"), budget="25%", prompts=[prompt], steps=12)
        assert batched[i].outputs[0].token_ids == alone[0].outputs[0].token_ids
        for a, b in zip(rec.steps(i), rec_alone.steps()):
            assert relative_error(a, b) < 1e-5
