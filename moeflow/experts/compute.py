"""Routed-expert compute over the slot pool: Dispatch -> Experts -> Combine.

Shapes: T tokens, K top-k, H hidden, I expert width, S slots, E experts per layer.

Each (token, pick) pair produces one weighted row of a [T, K, H] float32 buffer, and the
combine sums each token's K rows in pick order. A row depends only on its token, its
expert's weights and its routing weight, never on which slot holds the expert or on how
many rounds a small cache needed, so the output is the same at every expert budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.experts.cache import ExpertCache


def expert_rows(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Write rows[t, k] = weights[t, k] * expert(slot_ids[t, k])(x[t]) where slot_ids >= 0.

    x [T, H]; slot_ids [T, K] (-1: skip); weights [T, K]; w_gate_up [S, 2I, H] and
    w_down [S, H, I] (strided views of the pool); rows [T, K, H] float32.
    """
    T, K = slot_ids.shape
    flat = slot_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_slots = flat[order]
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    I = w_down.shape[-1]
    out = rows.view(T * K, -1)
    w = weights.reshape(-1)
    start = 0
    for slot, n in zip(slots.tolist(), counts.tolist()):
        pairs = order[start : start + n]
        start += n
        if slot < 0:
            continue
        h = F.linear(x[pairs // K], w_gate_up[slot])
        h = F.silu(h[:, :I]) * h[:, I:]
        y = F.linear(h, w_down[slot])
        out[pairs] = y.float() * w[pairs, None].float()


def combine(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, K, H] weighted rows -> [T, H], summing picks in order."""
    return rows.sum(dim=1).to(dtype)


class CachedExperts:
    """Runs a layer's routed experts through the expert cache."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        T, K = topk_ids.shape
        rows = torch.zeros(T, K, x.shape[-1], dtype=torch.float32, device=x.device)
        if cache.fully_resident:
            slot_ids = cache.slot_table[cache.ordinal(layer)][topk_ids]
            cache.count_resident_hits(layer, topk_ids)
            expert_rows(x, slot_ids, topk_weights, cache.w_gate_up, cache.w_down, rows)
            return combine(rows, x.dtype)
        # The router has spoken: the host must learn which experts to move (one sync per layer).
        needed = torch.unique(topk_ids).tolist()
        while needed:
            got = cache.acquire(layer, needed)
            if not got:
                raise RuntimeError(f"expert cache: no slot could be freed for layer {layer}")
            table = torch.full((cache.num_experts,), -1, dtype=torch.int64)
            table[list(got)] = torch.tensor(list(got.values()), dtype=torch.int64)
            slot_ids = table.to(x.device, non_blocking=True)[topk_ids]
            expert_rows(x, slot_ids, topk_weights, cache.w_gate_up, cache.w_down, rows)
            cache.release(list(got.values()))
            needed = [e for e in needed if e not in got]
        return combine(rows, x.dtype)
