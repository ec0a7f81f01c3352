"""Expert compute over the slot pool through torch._grouped_mm (torch >= 2.8).

T tokens, K top-k, H hidden, I expert width, S slots, M = T*K (token, k) pairs.

Dispatch: sort the M pairs by slot (stable), dropped picks (-1) last; group ends per slot come from
searchsorted on the sorted keys (torch.bincount would sync on CUDA: it reads the max back to size its output).
Experts: grouped GEMM for gate_up over the WHOLE pool (slots with no pairs are empty groups), SiLU*mul,
grouped GEMM for down. Combine: weight each row in float32, scatter back to (t, k) order, sum over k in order.
No host syncs, static shapes: CUDA-graph capturable for a fixed T (on CUDA only for bfloat16, see below).

What _grouped_mm needs (aten GroupedMMUtils.h / cuda/GroupMM.cu, checked here up front):
- mat_b is [S, K_dim, N]: the pool views transposed in their last two dims (w_gate_up.mT is [S, H, 2I] with
  strides (3IH, 1, H): "column-major"), which the kernel accepts as is: no copy of the pool. Each group's B
  pointer is base + s * stride(0), so the pool's stride(0) = 3IH is honoured.
- the leading dimension of every operand (H for x and gate_up, I for h and down) and every base and per-group
  pointer must be 16-byte aligned: H, I multiples of 8 (16-bit) / 4 (float32), I*H a multiple of 8.
- offsets are int32 group ends; groups may be empty; in the 2D x 3D case the M offsets need no alignment.
  Rows past offs[-1] (our dropped picks) are left uninitialised: they are masked out below, not multiplied by 0.
- fewer than 1024 groups (slots).
- On CUDA only bfloat16 on sm90/sm100 takes the CUTLASS path; float16/float32 fall back to a per-group mm loop
  that copies the offsets to the host (a sync: works eagerly, cannot be graph-captured). Use "triton" there.
"""

import torch
import torch.nn.functional as F

from moeflow.experts.kernels.reference import check_inputs, check_rows, combine_rows

MAX_GROUPS = 1023


def grouped_unsupported_reason(x, w_gate_up, w_down) -> str | None:
    """Why _grouped_mm cannot take these operands without a copy, or None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (needs >= 2.8)"
    S, I2, H = w_gate_up.shape
    I = I2 // 2
    align = 16 // x.element_size()
    if S > MAX_GROUPS:
        return f"_grouped_mm handles at most {MAX_GROUPS} groups, the pool has {S} slots"
    if H % align or I % align:
        return f"H={H} and I={I} must be multiples of {align} elements (16 bytes) for _grouped_mm"
    for name, w, ld in (("w_gate_up", w_gate_up, H), ("w_down", w_down, I)):
        if w.stride(2) != 1 or w.stride(1) != ld:
            return f"{name} must be row-major in its last two dims, got strides {tuple(w.stride())}"
        if (w.stride(0) * w.element_size()) % 16:
            return f"{name}.stride(0)={w.stride(0)} elements is not a multiple of 16 bytes"
        if x.is_cuda and w.data_ptr() % 16:
            return f"{name} does not start on a 16-byte boundary"
    return None


def slot_groups(slot_ids: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (t, k) pairs by slot. Returns order [M] (pair index in sorted position), valid [M] (sorted
    position holds a live pick), offs [S] int32 (exclusive end of each slot's group)."""
    flat = slot_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < S), flat, S)  # dropped (-1) picks sort last, past offs[-1]
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(S, device=key.device, dtype=key.dtype)
    offs = torch.searchsorted(sorted_key, bounds, right=True, out_int32=True)
    return order, sorted_key < S, offs


def _weighted_rows(x, slot_ids, weights, w_gate_up, w_down, S: int, I: int):
    """(order, valid, y): y [M, H] float32 = weight * expert output per pair in slot-sorted order."""
    K = slot_ids.shape[1]
    order, valid, offs = slot_groups(slot_ids, S)
    xs = x.index_select(0, torch.div(order, K, rounding_mode="floor"))  # [M, H] contiguous
    gate_up = torch._grouped_mm(xs, w_gate_up.mT, offs=offs)  # [M, 2I]
    h = (F.silu(gate_up[:, :I].float()) * gate_up[:, I:].float()).to(x.dtype)
    y = torch._grouped_mm(h, w_down.mT, offs=offs)  # [M, H]; rows past offs[-1] are uninitialised
    w = weights.reshape(-1).index_select(0, order).float()
    return order, valid, y.float() * w.unsqueeze(1)


def _check(x, slot_ids, weights, w_gate_up, w_down):
    dims = check_inputs(x, slot_ids, weights, w_gate_up, w_down)
    reason = grouped_unsupported_reason(x, w_gate_up, w_down)
    if reason is not None:
        raise ValueError(f"grouped backend: {reason}; use backend='triton' or 'reference'")
    return dims


def grouped_rows(x, slot_ids, weights, w_gate_up, w_down, rows) -> None:
    """reference_rows through _grouped_mm: live picks' rows written, dropped picks' rows kept as they were."""
    T, K, H, I, S = _check(x, slot_ids, weights, w_gate_up, w_down)
    flat_rows = check_rows(rows, T, K, H, x.device)
    if T * K == 0:
        return
    order, valid, y = _weighted_rows(x, slot_ids, weights, w_gate_up, w_down, S, I)
    y = torch.where(valid.unsqueeze(1), y, flat_rows.index_select(0, order))
    flat_rows.index_copy_(0, order, y)


def moe_grouped(x, slot_ids, weights, w_gate_up, w_down) -> torch.Tensor:
    T, K, H, I, S = _check(x, slot_ids, weights, w_gate_up, w_down)
    if T * K == 0:
        return torch.zeros(T, H, dtype=x.dtype, device=x.device)
    order, valid, y = _weighted_rows(x, slot_ids, weights, w_gate_up, w_down, S, I)
    y = torch.where(valid.unsqueeze(1), y, 0.0)  # mask, never multiply: the garbage rows may be NaN
    rows = torch.empty(T * K, H, dtype=torch.float32, device=x.device).index_copy_(0, order, y)
    return combine_rows(rows.view(T, K, H), x.dtype)
