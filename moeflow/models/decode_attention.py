"""Decode attention straight from the KV cache (placeholder: the reference path only, until the kernel lands)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(q, k_cache, v_cache, rows, context_lens, scale: float, window: int | None,
                     backend: str = "auto") -> torch.Tensor:
    B, N, D = q.shape
    k, v = k_cache[rows], v_cache[rows]  # [B, G, M, D]
    k_pos = torch.arange(k.shape[2], device=q.device)
    q_pos = context_lens - 1
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > (q_pos[:, None] - window)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=allowed[:, None, None, :], scale=scale,
                                         enable_gqa=N != k.shape[1])
    return out[:, :, 0, :].reshape(B, -1)
