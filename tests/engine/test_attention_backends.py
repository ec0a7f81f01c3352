"""Attention shapes and backends: prefill keeps off cuDNN's backend, which plans anew for every new shape, and
eager decode reads keys at a few bucketed lengths, not one length per step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import greedy
from moeflow import LLM


def test_prefill_keeps_off_cudnn_and_decode_sees_bucketed_context_lengths(checkpoint, monkeypatch):
    llm = LLM(str(checkpoint("qwen3_moe", "per_expert")), device="cpu", dtype="float32", max_model_len=300)
    seen = []  # (query length, key length, cudnn allowed, flash allowed) per attention call
    real = F.scaled_dot_product_attention

    def spy(q, k, *args, **kwargs):
        seen.append((q.shape[-2], k.shape[-2], torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled()))
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    llm.generate([[0, 5, 6, 7, 8], [0, 9, 10]], greedy(4))
    prefill = [s for s in seen if s[0] > 1]
    decode = [s for s in seen if s[0] == 1]
    assert {(q, k) for q, k, _, _ in prefill} == {(5, 5), (3, 3)}
    assert all(not cudnn and flash for _, _, cudnn, flash in prefill)
    assert {k for _, k, _, _ in decode} == {256}, "decode pads its context to the first bucket, 256"
    assert all(cudnn == before for _, _, cudnn, _ in decode), "decode keeps torch's own backend choice"
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
