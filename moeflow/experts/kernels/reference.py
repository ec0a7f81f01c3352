"""Plain-torch expert compute over the slot pool: the definition every fast path is tested against.

T tokens, K top-k, H hidden, I expert width, S slots.
  x          [T, H]      float32 | bfloat16 | float16
  slot_ids   [T, K]      int32 | int64, in [0, S) or -1 (a dropped pick: contributes zero)
  weights    [T, K]      float32 or x.dtype (routing weights)
  w_gate_up  [S, 2I, H]  rows 0..I-1 gate (w1), rows I..2I-1 up (w3); a strided view of the pool is fine
  w_down     [S, H, I]
  out        [T, H]      x.dtype

out[t] = sum_{k=0..K-1} weights[t,k] * down(silu(gate(x[t])) * up(x[t])), with each (t, k) term kept in
float32 and the sum taken in k order. Because every (t, k) row is computed on its own and summed in a fixed
order, the result does not depend on which slot holds which expert: the exact mode relies on that.
"""

import torch
import torch.nn.functional as F

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(x, slot_ids, weights, w_gate_up, w_down) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices (never values: that would need a host sync); return (T, K, H, I, S)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    T, H = x.shape
    if slot_ids.dim() != 2 or slot_ids.shape[0] != T:
        raise ValueError(f"slot_ids must be [T={T}, K], got shape {tuple(slot_ids.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    K = slot_ids.shape[1]
    if tuple(weights.shape) != (T, K):
        raise ValueError(f"weights must be [T={T}, K={K}] like slot_ids, got shape {tuple(weights.shape)}")
    if weights.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"weights must be float32 or x.dtype ({x.dtype}), got {weights.dtype}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("w_gate_up must be [S, 2I, H] and w_down [S, H, I]")
    S, I2, H_w = w_gate_up.shape
    I = I2 // 2
    if I2 % 2 or H_w != H:
        raise ValueError(f"w_gate_up must be [S, 2I, H={H}], got shape {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (S, H, I):
        raise ValueError(f"w_down must be [S={S}, H={H}, I={I}], got shape {tuple(w_down.shape)}")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"expert weights must have x's dtype {x.dtype}, got {w_gate_up.dtype} / {w_down.dtype}")
    devices = {t.device for t in (x, slot_ids, weights, w_gate_up, w_down)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return T, K, H, I, S


def combine_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, K, H] float32 per-(t, k) terms -> [T, H] in dtype, summed in k order (never a tree reduction)."""
    acc = rows[:, 0].clone()
    for k in range(1, rows.shape[1]):
        acc += rows[:, k]
    return acc.to(dtype)


def check_rows(rows: torch.Tensor, T: int, K: int, H: int, device: torch.device) -> torch.Tensor:
    """rows must be [T, K, H] float32 on x's device with (t, k) rows at one stride; return its [T*K, H] view."""
    if tuple(rows.shape) != (T, K, H) or rows.dtype != torch.float32 or rows.device != device:
        raise ValueError(f"rows must be float32 [T={T}, K={K}, H={H}] on {device}, got {rows.dtype} "
                         f"{tuple(rows.shape)} on {rows.device}")
    if rows.stride(2) != 1 or (T > 1 and K > 0 and rows.stride(0) != K * rows.stride(1)):
        raise ValueError(f"rows must be contiguous in its last dim with uniform (t, k) row stride, got {rows.stride()}")
    return rows.view(T * K, H)


def reference_rows(x, slot_ids, weights, w_gate_up, w_down, rows) -> None:
    """rows[t, k] = weights[t, k] * expert(slot_ids[t, k])(x[t]) in float32 for every live pick; rows of
    dropped picks (-1) are left as they are. Loops over the distinct slots in use, matmuls in x.dtype."""
    T, K, H, I, S = check_inputs(x, slot_ids, weights, w_gate_up, w_down)
    flat_rows = check_rows(rows, T, K, H, x.device)
    if T == 0 or K == 0:
        return
    flat = slot_ids.reshape(-1).long()
    lo, hi = int(flat.min()), int(flat.max())  # the reference may sync; the fast paths never do
    if lo < -1 or hi >= S:
        raise ValueError(f"slot_ids must lie in [0, {S}) or be -1, got values in [{lo}, {hi}]")
    flat_w = weights.reshape(-1)
    for s in torch.unique(flat).tolist():
        if s < 0:
            continue
        idx = (flat == s).nonzero(as_tuple=True)[0]
        xs = x.index_select(0, idx // K)
        gate, up = w_gate_up[s, :I], w_gate_up[s, I:]
        h = (F.silu((xs @ gate.T).float()) * (xs @ up.T).float()).to(x.dtype)
        y = h @ w_down[s].T
        flat_rows[idx] = flat_w[idx].float().unsqueeze(1) * y.float()


def moe_reference(x, slot_ids, weights, w_gate_up, w_down) -> torch.Tensor:
    """The module docstring's formula: per-(t, k) float32 rows, then an in-order sum over k."""
    T, K, H, _, _ = check_inputs(x, slot_ids, weights, w_gate_up, w_down)
    rows = torch.zeros(T, K, H, dtype=torch.float32, device=x.device)
    if T == 0 or K == 0:
        return rows.sum(1).to(x.dtype)
    reference_rows(x, slot_ids, weights, w_gate_up, w_down, rows)
    return combine_rows(rows, x.dtype)
