"""Shared by the decode-attention tests: random queries and caches, the formula as a plain per-sequence loop, the
error measure, and a cache poisoned where a call must not read.

B sequences, N query heads, G KV heads, D head dim, R cache rows, M max_model_len.
"""

import torch
import torch.nn.functional as F


def make_case(B, N, G, D, M, *, dtype=torch.float32, device="cpu", seed=0, lens=None, spare_rows=5):
    """Random q and cache (never zeros), B distinct rows drawn from R = B + spare_rows, none of them row 0 (so
    never 0..B-1), and lengths in 1..M unless given."""
    gen = torch.Generator(device=device).manual_seed(seed)
    R = B + spare_rows
    k_cache = torch.randn(R, G, M, D, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(R, G, M, D, generator=gen, device=device).to(dtype)
    q = torch.randn(B, N, D, generator=gen, device=device).to(dtype)
    rows = torch.randperm(R - 1, generator=gen, device=device)[:B] + 1
    if lens is None:
        lens = torch.randint(1, M + 1, (B,), generator=gen, device=device)
    else:
        lens = torch.as_tensor(lens, dtype=torch.int64).to(device)
    return q, k_cache, v_cache, rows, lens


def loop_attention(q, k_cache, v_cache, rows, lens, scale, window):
    """The formula written plainly: per sequence, torch SDPA in float64 on exactly the keys it may see
    (its own row, positions max(0, len - window) .. len - 1), KV heads repeated for their query heads."""
    B, N, D = q.shape
    G = k_cache.shape[1]
    out = torch.zeros(B, N * D, dtype=torch.float64)
    for b in range(B):
        length, row = int(lens[b]), int(rows[b])
        lo = 0 if window is None else max(0, length - window)
        if length == 0:
            continue
        k = k_cache[row, :, lo:length].cpu().double().repeat_interleave(N // G, dim=0)  # [N, keys, D]
        v = v_cache[row, :, lo:length].cpu().double().repeat_interleave(N // G, dim=0)
        o = F.scaled_dot_product_attention(q[b].cpu().double()[:, None, :], k, v, scale=scale)  # [N, 1, D]
        out[b] = o.reshape(-1)
    return out


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst relative error over sequences: a long context's output is small (an average of many values),
    so one norm over the batch would let short sequences hide errors in the long ones."""
    out, ref = out.double().cpu(), ref.double().cpu()
    diff = (out - ref).norm(dim=1)
    scale = ref.norm(dim=1)
    return float(torch.where(scale > 0, diff / scale.clamp(min=1e-300), diff).max())


def poison_unread(k_cache, v_cache, rows, lens, window):
    """NaN everywhere the call must not read: rows not in the batch, and in each batch row the positions
    past its length and before its window."""
    M = k_cache.shape[2]
    keep_rows = torch.zeros(k_cache.shape[0], dtype=torch.bool, device=k_cache.device)
    keep_rows[rows] = True
    for cache in (k_cache, v_cache):
        cache[~keep_rows] = float("nan")
    pos = torch.arange(M, device=k_cache.device)
    for b in range(rows.numel()):
        length = int(lens[b])
        bad = pos >= length
        if window is not None:
            bad |= pos < length - window
        for cache in (k_cache, v_cache):
            cache[int(rows[b]), :, bad] = float("nan")
