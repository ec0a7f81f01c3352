"""Fused MoE expert compute in Triton over the strided slot pool (the design of vLLM's fused_moe).

T tokens, K top-k, H hidden, I expert width, S slots, M = T*K (token, k) pairs, BM = block_m rows per tile.

1. align (3 small kernels, no host sync): count pairs per slot with atomics (the returned old count is the
   pair's rank inside its slot), pad each slot's count up to BM, lay the pairs out slot by slot in
   `sorted_ids` (padding holds the sentinel M) and give every BM-row block its slot in `block_slot` (-1 past
   the end). The number of blocks has a static upper bound NB = n + (M - n) // BM with n = min(S, M), so
   every buffer has a fixed size for a fixed T: the whole call is CUDA-graph capturable.
2. gate_up kernel: one program per (block, BLOCK_N columns of I) computes the gate and the up tile against
   the same x rows, applies SiLU(gate) * up in float32 and writes only h [EM, I] (never the [.., 2I] product).
3. down kernel: h @ down[slot].T times the routing weight, float32 accumulate, one row per (t, k) pair.
4. combine kernel: out[t] = sum over k = 0..K-1 in order of the pair rows; dropped picks (-1) are skipped.

Rows never interact inside a GEMM tile and the combine order is fixed, so the result does not depend on which
slot holds an expert, nor on the (atomics-decided) order of pairs inside a slot.
Expert weights are read through pointer arithmetic on the pool view (stride(0) = 3IH, offsets in int64: a
Mixtral-sized pool passes 2^31 elements). H and I need not be multiples of the tile sizes.
"""

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from moeflow.experts.kernels.reference import check_inputs, check_rows

_SMEM_BUDGET = 160 * 1024  # bytes per program; H100 allows 227 KiB, leave room for the epilogue
_DECODE_PROGRAMS = 528  # ~4 programs per H100 SM keep enough weight loads in flight to saturate HBM


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Tile sizes for the two GEMM kernels (1: gate_up + SiLU*mul, 2: down * weight)."""

    block_m: int
    block_n1: int
    block_k1: int
    warps1: int
    stages1: int
    block_n2: int
    block_k2: int
    warps2: int
    stages2: int

    def __post_init__(self):
        for name in ("block_m", "block_n1", "block_k1", "block_n2", "block_k2"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name}={v} must be a power of two >= 16 (tl.dot)")


def _fit_stages(stages: int, per_stage_bytes: int) -> int:
    while stages > 2 and stages * per_stage_bytes > _SMEM_BUDGET:
        stages -= 1
    return stages


def pick_config(M: int, S: int, H: int, I: int, dtype: torch.dtype) -> TileConfig:
    """Tile sizes from static shapes only (never from routing values, so a captured graph stays valid).

    Decode (few pairs per slot): BM=16 and narrow N tiles, so that even T=1 (K slots, one live row each)
    launches hundreds of programs streaming weights: the kernels are then bound by weight bandwidth.
    """
    per_slot = M / max(1, min(M, S))
    if per_slot <= 16:
        bm, n1, k1, w1, n2, k2, w2 = 16, 32, 128, 4, 32, 128, 4
        if num_blocks(M, S, bm) * triton.cdiv(I, n1) < _DECODE_PROGRAMS:  # batch 1-2: split I finer
            n1 = 16
    elif per_slot <= 48:
        bm, n1, k1, w1, n2, k2, w2 = 32, 64, 64, 4, 64, 64, 4
    else:
        bm, n1, k1, w1, n2, k2, w2 = 64, 64, 64, 4, 128, 64, 4
    elt = dtype.itemsize
    if elt == 4:  # float32 tiles take twice the shared memory, and the ieee dot (FMA) more registers
        k1, k2 = k1 // 2, k2 // 2
        if bm >= 64:
            w1 = w2 = 8
    s1 = _fit_stages(4, (bm * k1 + 2 * k1 * n1) * elt)
    s2 = _fit_stages(4, (bm * k2 + k2 * n2) * elt)
    return TileConfig(bm, n1, k1, w1, s1, n2, k2, w2, s2)


def with_block_m(cfg: TileConfig, block_m: int, dtype: torch.dtype) -> TileConfig:
    """`cfg` with row tiles of block_m, its N and K blocks and warps kept, its stages fitted to shared memory again
    (for experiments with taller tiles: pick_config never returns these)."""
    elt = dtype.itemsize
    return replace(
        cfg, block_m=block_m,
        stages1=_fit_stages(4, (block_m * cfg.block_k1 + 2 * cfg.block_k1 * cfg.block_n1) * elt),
        stages2=_fit_stages(4, (block_m * cfg.block_k2 + cfg.block_k2 * cfg.block_n2) * elt))


def num_blocks(M: int, S: int, block_m: int) -> int:
    """Upper bound on sum_s ceil(count_s / BM) over the at most min(S, M) non-empty slots."""
    n = min(S, M)
    return n + (M - n) // block_m


# ---------------------------------------------------------------------------------------------- align


@triton.jit(do_not_specialize=["M", "S"])
def _count_kernel(slot_ptr, counts_ptr, rank_ptr, M, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < M
    s = tl.load(slot_ptr + offs, mask=in_range, other=-1)
    live = in_range & (s >= 0) & (s < S)  # compare before narrowing: a huge int64 must not wrap into range
    s = tl.where(live, s, 0).to(tl.int32)
    ones = tl.full([BLOCK], 1, tl.int32)
    rank = tl.atomic_add(counts_ptr + s, ones, mask=live, sem="relaxed")
    tl.store(rank_ptr + offs, rank, mask=live)


@triton.jit(do_not_specialize=["S", "NB", "EM", "M"])
def _offsets_kernel(
    counts_ptr, pstart_ptr, block_slot_ptr, sorted_ids_ptr, S, NB, EM, M,
    BLOCK_M: tl.constexpr, S_PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_FILL: tl.constexpr,
):
    s = tl.arange(0, S_PAD)
    s_ok = s < S
    counts = tl.load(counts_ptr + s, mask=s_ok, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, axis=0)
    tl.store(pstart_ptr + s, pend - padded, mask=s_ok)
    total = tl.sum(padded, axis=0)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        first_row = b * BLOCK_M
        # the block's slot = how many slots end at or before its first row
        before = (pend[None, :] <= first_row[:, None]) & s_ok[None, :]
        slot = tl.sum(before.to(tl.int32), axis=1)
        slot = tl.where(first_row < total, slot, -1)
        tl.store(block_slot_ptr + b, slot, mask=b < NB)
    sentinel = tl.zeros([BLOCK_FILL], dtype=tl.int32) + M
    for e0 in range(0, EM, BLOCK_FILL):
        e = e0 + tl.arange(0, BLOCK_FILL)
        tl.store(sorted_ids_ptr + e, sentinel, mask=e < EM)


@triton.jit(do_not_specialize=["M", "S"])
def _place_kernel(slot_ptr, rank_ptr, pstart_ptr, sorted_ids_ptr, M, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < M
    s = tl.load(slot_ptr + offs, mask=in_range, other=-1)
    live = in_range & (s >= 0) & (s < S)
    s = tl.where(live, s, 0).to(tl.int32)
    rank = tl.load(rank_ptr + offs, mask=live, other=0)
    start = tl.load(pstart_ptr + s, mask=live, other=0)
    tl.store(sorted_ids_ptr + start + rank, offs, mask=live)


_ALIGN_BLOCK = 1024


def align_pairs(slot_flat: torch.Tensor, S: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_flat [M] -> (sorted_ids [NB*BM] int32 pair index or M for padding, block_slot [NB] int32 or -1)."""
    M = slot_flat.numel()
    NB = num_blocks(M, S, block_m)
    EM = NB * block_m
    dev = slot_flat.device
    counts = torch.zeros(S, dtype=torch.int32, device=dev)
    rank = torch.empty(M, dtype=torch.int32, device=dev)
    pstart = torch.empty(S, dtype=torch.int32, device=dev)
    block_slot = torch.empty(NB, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(EM, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(M, _ALIGN_BLOCK),)
    _count_kernel[grid](slot_flat, counts, rank, M, S, BLOCK=_ALIGN_BLOCK)
    s_pad = max(16, triton.next_power_of_2(S))
    block_b = max(16, min(128, 4096 // s_pad))
    _offsets_kernel[(1,)](
        counts, pstart, block_slot, sorted_ids, S, NB, EM, M,
        BLOCK_M=block_m, S_PAD=s_pad, BLOCK_B=block_b, BLOCK_FILL=1024, num_warps=4,
    )
    _place_kernel[grid](slot_flat, rank, pstart, sorted_ids, M, S, BLOCK=_ALIGN_BLOCK)
    return sorted_ids, block_slot


# ---------------------------------------------------------------------------------------------- GEMMs


@triton.jit(do_not_specialize=["M", "K_top"])
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_slot_ptr,
    M, K_top, H, I,
    stride_xt, stride_xh, stride_ws, stride_wn, stride_wh, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    row_ok = pair < M
    tok = (pair // K_top).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    kk = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tok[:, None] * stride_xt + kk[None, :] * stride_xh
    w_slot = w_ptr + slot.to(tl.int64) * stride_ws
    g_ptrs = w_slot + cols.to(tl.int64)[None, :] * stride_wn + kk[:, None] * stride_wh  # gate.T tile [BK, BN]
    u_ptrs = w_slot + (cols + I).to(tl.int64)[None, :] * stride_wn + kk[:, None] * stride_wh
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = kk < H - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    # padding rows hold h = 0 (their x rows loaded as 0); writing them keeps every row of h defined
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit(do_not_specialize=["M", "K_top", "stride_rt", "stride_rk"])
def _down_kernel(
    h_ptr, w_ptr, rw_ptr, rows_ptr, sorted_ids_ptr, block_slot_ptr,
    M, K_top, H, I,
    stride_hm, stride_ws, stride_wn, stride_wi, stride_rt, stride_rk, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    row_ok = pair < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    kk = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + kk[None, :]
    w_slot = w_ptr + slot.to(tl.int64) * stride_ws
    b_ptrs = w_slot + cols.to(tl.int64)[None, :] * stride_wn + kk[:, None] * stride_wi  # down.T tile [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = kk < I - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wi
    t = (pair // K_top).to(tl.int64)
    k = (pair % K_top).to(tl.int64)
    rw = tl.load(rw_ptr + t * stride_rt + k * stride_rk, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    out_ptrs = rows_ptr + pair.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(rows_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["K_top", "S", "stride_st", "stride_sk"])
def _combine_kernel(
    rows_ptr, slot_ptr, out_ptr, K_top, H, S,
    stride_st, stride_sk, stride_rm, stride_ot,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(K_top):  # fixed k order: the sum never depends on the slot layout
        s = tl.load(slot_ptr + t * stride_st + k * stride_sk)
        live = (s >= 0) & (s < S)  # dropped picks were never written: skip, do not read
        v = tl.load(rows_ptr + (t * K_top + k) * stride_rm + cols, mask=col_ok & live, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------- entry


def _launch_experts(x, slot_ids, weights, w_gate_up, w_down, rows, cfg: TileConfig, S: int, poison: bool):
    """align + gate_up + down: rows[pair] (a [T*K, H] view) = weight * expert(x) for every live pair."""
    M, H = rows.shape
    K = slot_ids.shape[1]
    I = w_down.shape[2]
    ieee = x.dtype == torch.float32
    sorted_ids, block_slot = align_pairs(slot_ids.reshape(-1), S, cfg.block_m)
    NB = block_slot.numel()
    h = torch.empty(NB * cfg.block_m, I, dtype=x.dtype, device=x.device)
    if poison:
        h.fill_(float("nan"))
    _gate_up_kernel[(NB, triton.cdiv(I, cfg.block_n1))](
        x, w_gate_up, h, sorted_ids, block_slot,
        M, K, H, I,
        x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), h.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1, IEEE=ieee,
        num_warps=cfg.warps1, num_stages=cfg.stages1,
    )
    _down_kernel[(NB, triton.cdiv(H, cfg.block_n2))](
        h, w_down, weights, rows, sorted_ids, block_slot,
        M, K, H, I,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2),
        weights.stride(0), weights.stride(1), rows.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2, IEEE=ieee,
        num_warps=cfg.warps2, num_stages=cfg.stages2,
    )


def moe_triton(
    x, slot_ids, weights, w_gate_up, w_down, *,
    config: TileConfig | None = None, rows_dtype: torch.dtype = torch.float32, poison: bool = False,
) -> torch.Tensor:
    """Same contract as moe_reference. Slot ids outside [0, S) other than -1 are treated as dropped (the
    kernels cannot check values without a host sync; moe_reference raises on them).

    config overrides pick_config; rows_dtype is the dtype of the per-(t, k) rows (float32 keeps the
    reference's rounding; x.dtype halves that traffic); poison NaN-fills every intermediate buffer and the
    output before the kernels run, so that tests see any row the kernels fail to write."""
    T, K, H, I, S = check_inputs(x, slot_ids, weights, w_gate_up, w_down)
    M = T * K
    if M == 0 or S == 0:
        return torch.zeros(T, H, dtype=x.dtype, device=x.device)
    cfg = config or pick_config(M, S, H, I, x.dtype)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        rows = torch.empty(M, H, dtype=rows_dtype, device=x.device)
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
        if poison:
            rows.fill_(float("nan"))
            out.fill_(float("nan"))
        _launch_experts(x, slot_ids, weights, w_gate_up, w_down, rows, cfg, S, poison)
        block_h = min(1024, max(16, triton.next_power_of_2(H)))
        _combine_kernel[(T, triton.cdiv(H, block_h))](
            rows, slot_ids, out, K, H, S,
            slot_ids.stride(0), slot_ids.stride(1), rows.stride(0), out.stride(0),
            BLOCK_H=block_h, num_warps=4,
        )
    return out


def triton_rows(x, slot_ids, weights, w_gate_up, w_down, rows, *, config: TileConfig | None = None) -> None:
    """reference_rows through the kernels: rows [T, K, H] float32 gets weight * expert(x) for every live pick;
    rows of dropped picks are not touched (an engine filling rows over several cache rounds relies on it)."""
    T, K, H, I, S = check_inputs(x, slot_ids, weights, w_gate_up, w_down)
    flat_rows = check_rows(rows, T, K, H, x.device)
    if T * K == 0 or S == 0:
        return
    cfg = config or pick_config(T * K, S, H, I, x.dtype)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _launch_experts(x, slot_ids, weights, w_gate_up, w_down, flat_rows, cfg, S, poison=False)
