"""The bundled default model: it loads in moeflow, is exactly transformers' model, and learned the corpus.

Held-out text: `tests/data/heldout/{domain}.jsonl` is the head of each domain's test split, written by
`moeflow data build` (see its SOURCES.md for where the text comes from and under which licence).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import LogitsRecorder, greedy, hf_greedy, relative_error
from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.data.corpus import DOMAINS, iter_jsonl
from moeflow.architectures.registry import spec_from_config
from moeflow.train import data as train_data
from moeflow.train import evaluate

HELDOUT = Path(__file__).parents[1] / "data" / "heldout"
WINDOWS_PER_DOMAIN = 4
# held-out perplexity must stay under this share of the unigram baseline's, in every domain
UNIGRAM_SHARE = 0.15


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), device="cpu", dtype="float32", expert_budget="25%", max_model_len=512,
               max_batch_size=8)


def test_bundled_model_is_a_small_learned_moe(model_dir):
    spec = spec_from_config(json.loads((model_dir / "config.json").read_text()))
    assert spec.architecture == "Qwen3MoeForCausalLM"
    assert spec.num_moe_layers >= 8 and spec.num_experts >= 32 and spec.router.top_k >= 4
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert weights <= 32 * 10**6
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "routing_stats.json", "expert_usage.png"):
        assert (model_dir / name).is_file(), name


def test_bundled_model_matches_transformers(model_dir, llm):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode("The history of the city")
    ref_tokens, ref_logits = hf_greedy(hf, prompt, 32)
    rec = LogitsRecorder(llm)
    out = llm.generate([prompt], greedy(32))
    assert out[0].outputs[0].token_ids == ref_tokens
    errors = [relative_error(a, b) for a, b in zip(rec.steps(), ref_logits)]
    assert len(errors) == 32 and max(errors) < 1e-4
    assert out.stats.cache.misses > 0, "the 25% budget made the cache load experts"


def test_heldout_perplexity_is_far_below_the_unigram_baseline(model_dir, llm):
    """Scored by moeflow itself (prompt logprobs), on windows of the length the model was trained on."""
    baseline = json.loads((model_dir / "routing_stats.json").read_text())["perplexity"]["unigram"]
    tokenizer, sep = train_data.load_tokenizer(model_dir)
    docs = [d for domain in DOMAINS for d in iter_jsonl(HELDOUT / f"{domain}.jsonl")]
    seq_len = evaluate.trained_seq_len(model_dir)
    windows = evaluate.eval_windows(tokenizer, sep, docs, seq_len, max_tokens=WINDOWS_PER_DOMAIN * seq_len)
    assert set(windows) == set(DOMAINS)
    prompts = [w.tolist() for domain in DOMAINS for w in windows[domain]]
    out = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    i = 0
    for domain in DOMAINS:
        nll, count = 0.0, 0
        for w in windows[domain]:
            logprobs = out[i].prompt_logprobs
            i += 1
            nll -= sum(logprobs[pos][int(w[pos])] for pos in range(1, len(w)))
            count += len(w) - 1
        ppl = math.exp(nll / count)
        assert ppl < UNIGRAM_SHARE * baseline[domain], f"{domain}: perplexity {ppl:.1f}, unigram {baseline[domain]:.1f}"
