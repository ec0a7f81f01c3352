"""Prefill attention keeps off cuDNN's backend, which plans anew for every prompt length; decode does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import greedy
from moeflow import LLM


def test_prefill_attention_runs_without_cudnn_and_leaves_the_flags_as_they_were(checkpoint, monkeypatch):
    llm = LLM(str(checkpoint("qwen3_moe", "per_expert")), device="cpu", dtype="float32", max_model_len=64)
    seen = []  # (query length, cudnn allowed, flash allowed) per attention call
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append((q.shape[-2], torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    llm.generate([[0, 5, 6, 7, 8], [0, 9, 10]], greedy(3))
    prefill = [s for s in seen if s[0] > 1]
    decode = [s for s in seen if s[0] == 1]
    assert prefill and decode
    assert all(not cudnn and flash for _, cudnn, flash in prefill)
    assert all(cudnn == before for _, cudnn, _ in decode), "decode keeps torch's own backend choice"
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
