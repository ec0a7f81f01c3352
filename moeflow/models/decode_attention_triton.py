"""Flash-decoding in Triton over one layer's KV cache (contract and reference: decode_attention.py).

B sequences, N query heads, G KV heads, QG = N / G query heads per KV head, D head dim, M max_model_len,
S key splits, BN keys per block; QG_PAD, D_PAD the power-of-two tile sizes (masked past QG and D).

1. split kernel, grid (B, G, S). Program (b, g, s) reads rows[b] and context_lens[b] from device memory and
   finds the blocks of BN keys sequence b attends to: [lo, len) with lo = len - window under a window, else 0.
   It takes the s-th of S equal shares of those blocks (so for a short context every split still gets work,
   and splits past the last block get none) and runs an online softmax in float32 over its share, for all QG
   query heads of KV head g at once: each K and V tile is loaded once per group. The QG query rows are padded
   to >= 16 (zero rows, masked on store) so that both products are tl.dot; D is padded to a power of two the
   same way (head dim 40 reads as 64 with masks). It writes its share's normalised output o [B, N, S, D] and
   log2-sum-exp lse [B, N, S] (-inf and o = 0 for an empty share: no NaN reaches the combine).
2. combine kernel, grid (B, N): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max), zero for length 0.
   With S = 1 the split kernel writes the normalised output itself and the combine is not launched.

The grid, the tile sizes and every buffer depend on the shapes (B, N, G, D, M) and S = num_splits(B, G, M)
alone, never on rows or lengths, and nothing is read back to the host: a call captured in a CUDA graph once
replays correctly for any new rows and lengths copied into its input tensors.
The scratch buffers (o, lse) are allocated per call: their size is fixed for a fixed batch, so inside a graph
capture they come from the graph's private pool once and are reused by every replay.
"""

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from moeflow.models.decode_attention import check_inputs, num_splits

_LOG2E = 1.4426950408889634


def launch_config(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BN keys per block, warps) of the split kernel. 64 keys of D <= 128 at 2 bytes an element take ~105
    registers a thread with 4 warps (ptxas, sm_90): four programs fit an SM. float32 (whose ieee products run
    on FMA units and need far more registers) and wider heads take half the keys and 8 warps; with 4 they spill.
    """
    if dtype == torch.float32 or triton.next_power_of_2(D) > 128:
        return 32, 8
    return 64, 4


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, rows_ptr, lens_ptr, o_ptr, lse_ptr,
    M, window, qk_scale, S,
    stride_qb, stride_qh, stride_qd,
    stride_kr, stride_kg, stride_km, stride_kd,
    stride_vr, stride_vg, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh,
    QG: tl.constexpr, D: tl.constexpr, QG_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    length = tl.minimum(tl.maximum(length, 0), M).to(tl.int32)
    row = tl.load(rows_ptr + b).to(tl.int64)
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)
    else:
        lo = length * 0
    first_blk = lo // BLOCK_N
    end_blk = (length + BLOCK_N - 1) // BLOCK_N  # every block in [first_blk, end_blk) holds a live key
    share = (end_blk - first_blk + S - 1) // S
    blk_lo = first_blk + s * share
    blk_hi = tl.minimum(blk_lo + share, end_blk)

    i = tl.arange(0, QG_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    head = g * QG + i
    i_ok = i < QG
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + row * stride_kr + g * stride_kg
    v_base = v_ptr + row * stride_vr + g * stride_vg

    m_i = tl.full([QG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QG_PAD], tl.float32)
    acc = tl.zeros([QG_PAD, D_PAD], tl.float32)
    for blk in range(blk_lo, blk_hi):
        pos = blk * BLOCK_N + n
        key_ok = (pos >= lo) & (pos < length)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + pos[:, None] * stride_km + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        # the block holds at least one live key, so every row's max is finite: no -inf - -inf below
        qk = tl.where(key_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + pos[:, None] * stride_vm + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    live = l_i > 0.0
    o = acc / tl.where(live, l_i, 1.0)[:, None]
    o_mask = i_ok[:, None] & d_ok[None, :]
    if DIRECT:
        out_ptrs = o_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(out_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        o_ptrs = o_ptr + b * stride_ob + head[:, None] * stride_oh + s * stride_os + d[None, :] * stride_od
        tl.store(o_ptrs, o, mask=o_mask)
        lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + head * stride_lh + s, lse, mask=i_ok)


@triton.jit
def _combine_kernel(
    o_ptr, lse_ptr, out_ptr, S,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_outb, stride_outh,
    D: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_ok = sp < S
    d_ok = d < D
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + sp, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top > float("-inf"), top, 0.0)  # no live split (length 0): every weight 2^-inf = 0
    w = tl.exp2(lse - top)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + d[None, :] * stride_od,
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention_triton(
    q, k_cache, v_cache, rows, context_lens, scale: float, window: int | None, *,
    splits: int | None = None, poison: bool = False,
) -> torch.Tensor:
    """Same contract as decode_attention_reference. splits overrides num_splits (tests, benchmarks); poison
    NaN-fills the scratch buffers and the output before the kernels run, so that tests see anything the
    kernels fail to write."""
    B, N, G, D, M = check_inputs(q, k_cache, v_cache, rows, context_lens, window)
    S = num_splits(B, G, M) if splits is None else splits
    if S < 1:
        raise ValueError(f"splits must be >= 1, got {S}")
    if window is not None and window >= M:  # every length is <= M: such a window masks nothing
        window = None
    QG = N // G
    qg_pad = max(16, triton.next_power_of_2(QG))
    d_pad = max(16, triton.next_power_of_2(D))
    bn, warps = launch_config(D, q.dtype)
    common = dict(QG=QG, D=D, QG_PAD=qg_pad, D_PAD=d_pad, BLOCK_N=bn, HAS_WINDOW=window is not None,
                  IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=2)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        out = torch.empty(B, N * D, dtype=q.dtype, device=q.device)
        if poison:
            out.fill_(float("nan"))
        if B == 0:
            return out
        if S == 1:
            o, lse = out.view(B, N, D), out  # lse is not touched when DIRECT
            o_strides = (o.stride(0), o.stride(1), 0, o.stride(2))
            lse_strides = (0, 0)
        else:
            o = torch.empty(B, N, S, D, dtype=torch.float32, device=q.device)
            lse = torch.empty(B, N, S, dtype=torch.float32, device=q.device)
            if poison:
                o.fill_(float("nan"))
                lse.fill_(float("nan"))
            o_strides = o.stride()
            lse_strides = (lse.stride(0), lse.stride(1))
        _split_kernel[(B, G, S)](
            q, k_cache, v_cache, rows, context_lens, o, lse,
            M, 0 if window is None else window, scale * _LOG2E, S,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *o_strides, *lse_strides,
            DIRECT=S == 1, **common,
        )
        if S > 1:
            _combine_kernel[(B, N)](
                o, lse, out, S, *o.stride(), lse.stride(0), lse.stride(1), out.stride(0), D,
                D=D, S_PAD=max(2, triton.next_power_of_2(S)), D_PAD=d_pad, num_warps=4,
            )
    return out
