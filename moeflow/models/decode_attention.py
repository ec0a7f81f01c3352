"""Decode attention read straight from the KV cache: one new token per sequence against its cached context.

B sequences in the step, N query heads, G KV heads, QG = N / G query heads per KV head, D head dim,
R cache rows, M max_model_len, S key splits (Triton backend).

    out [B, N*D] = decode_attention(q [B, N, D], k_cache [R, G, M, D], v_cache [R, G, M, D],
                                    rows [B], context_lens [B], scale, window)

Why it exists: slicing the cache to a bucketed context length C and running masked SDPA (attend_decode) makes
the shapes depend on C, so decode CUDA graphs are keyed by (batch, context) bucket and get captured while
serving. Here each sequence's row and length are read from device tensors, so for a given batch size the work
launched is the same whatever the lengths: one graph per batch bucket, captured at start-up, replayed with new
`rows` and `context_lens`. The Triton kernel also reads only the keys each sequence attends to, not C of them.

Contract: sequence b's query sits at position context_lens[b] - 1 (its own key, already written to the cache,
included) and attends to keys 0 .. context_lens[b] - 1 of cache row rows[b], or, with a window, to the keys
with q_pos - k_pos < window. Keys beyond the length are never read, whatever they hold. A length of 0 gives
a zero output; lengths above M count as M (the kernel cannot check values without a host sync). Query head h
reads KV head h // QG (as SDPA's enable_gqa).

Backends: "reference" (plain torch, any device: the definition; reads all M keys and masks), "triton"
(flash-decoding kernels in decode_attention_triton.py; CUDA, or CPU under TRITON_INTERPRET=1). "auto" picks
triton on CUDA when triton imports, else reference. Triton is imported only when the triton backend is used.
"""

from __future__ import annotations

import os

import torch

from moeflow.experts.kernels import triton_available

BACKENDS = ("auto", "triton", "reference")

# Enough programs to keep every SM of an H100/H200 streaming keys (~4 per SM, as the MoE kernels aim for).
_TARGET_PROGRAMS = 528
_MIN_SPLIT_KEYS = 64  # one key block: a smaller share would be all overhead
_MAX_SPLITS = 64


def num_splits(batch: int, kv_heads: int, max_len: int) -> int:
    """S, the key splits per (sequence, KV head), from static shapes only (never from the lengths, so one
    captured graph serves every context): a power of two large enough that B*G*S programs fill the GPU, at most
    one split per 64 keys of max_len and at most 64. Each program takes one S-th of its sequence's keys."""
    want = -(-_TARGET_PROGRAMS // max(1, batch * kv_heads))
    splits = 1 << (want - 1).bit_length()
    return max(1, min(splits, _MAX_SPLITS, -(-max_len // _MIN_SPLIT_KEYS)))


def check_inputs(q, k_cache, v_cache, rows, context_lens, window) -> tuple[int, int, int, int, int]:
    """Shapes, dtypes and devices (never values: that would need a host sync); returns (B, N, G, D, M)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, N, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [R, G, M, D], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    B, N, D = q.shape
    _, G, M, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"head dim of q ({D}) and of the cache ({Dk}) differ")
    if G == 0 or N % G:
        raise ValueError(f"{N} query heads cannot share {G} KV heads evenly")
    for name, t in (("rows", rows), ("context_lens", context_lens)):
        if t.shape != (B,):
            raise ValueError(f"{name} must be [B] = [{B}], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q ({q.dtype}) and the cache ({k_cache.dtype}, {v_cache.dtype}) must share a dtype")
    devices = {t.device for t in (q, k_cache, v_cache, rows, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    return B, N, G, D, M


def decode_attention_reference(q, k_cache, v_cache, rows, context_lens, scale: float, window: int | None):
    """The definition: gather each sequence's row, mask the keys it may not see, softmax in float32 (float64
    for float64 inputs), the weighted sum of values; cast to q's dtype. Masked keys and values are zeroed
    before the products, so whatever the cache holds there (stale rows, NaN) cannot leak in."""
    B, N, G, D, M = check_inputs(q, k_cache, v_cache, rows, context_lens, window)
    cdt = torch.promote_types(q.dtype, torch.float32)
    pos = torch.arange(M, device=q.device)
    lens = context_lens[:, None].long()
    keep = pos[None, :] < lens  # [B, M]
    if window is not None:
        keep &= pos[None, :] >= lens - window  # q_pos - k_pos < window with q_pos = len - 1
    keep_kv = keep[:, None, :, None]  # [B, 1, M, 1]
    k = k_cache[rows].to(cdt).masked_fill(~keep_kv, 0.0)  # [B, G, M, D]
    v = v_cache[rows].to(cdt).masked_fill(~keep_kv, 0.0)
    qg = q.to(cdt).reshape(B, G, N // G, D)
    scores = torch.einsum("bgid,bgmd->bgim", qg, k) * scale
    keep_s = keep[:, None, None, :]  # [B, 1, 1, M]
    probs = torch.softmax(scores.masked_fill(~keep_s, float("-inf")), dim=-1)
    probs = probs.masked_fill(~keep_s, 0.0)  # a length-0 row is all NaN after the softmax: make it zeros
    out = torch.einsum("bgim,bgmd->bgid", probs, v)
    return out.reshape(B, N * D).to(q.dtype)


def resolve_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The concrete backend "auto" stands for on q's device, or a clear error for an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def decode_attention(q, k_cache, v_cache, rows, context_lens, scale: float, window: int | None, *,
                     backend: str = "auto") -> torch.Tensor:
    """One new token per sequence against its cached context, read straight from the KV cache.
    q [B, N, D] (model dtype); k_cache, v_cache [R, G, M, D]: ONE layer's cache (R rows, G KV heads, M max_model_len);
    rows [B] int64 (each sequence's KV row), context_lens [B] int64 (keys valid for each sequence, the new token's
    own key included: its query sits at position context_lens-1 and attends to keys 0..context_lens-1, or only the last
    `window` of them when window is set: keys with q_pos - k_pos < window). Returns [B, N*D] in q's dtype.

    On CUDA with the triton backend: no host sync, and a launch that depends on shapes only (CUDA-graph safe)."""
    if resolve_backend(q, backend) == "triton":
        from moeflow.models.decode_attention_triton import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, rows, context_lens, scale, window)
    return decode_attention_reference(q, k_cache, v_cache, rows, context_lens, scale, window)


__all__ = ["BACKENDS", "check_inputs", "decode_attention", "decode_attention_reference", "num_splits",
           "resolve_backend"]
