"""Per-layer slot quotas: how an expert cache's slots are shared between its MoE layers.

Every layer has a quota of slots (equal by default; a planner may set them per step). When a layer needs a slot
and none is free, `donor_layer` says which layer gives one up: the cache then evicts from that layer.
"""

from __future__ import annotations

import numpy as np


def equal_quotas(num_slots: int, num_layers: int) -> np.ndarray:
    """num_slots shared as evenly as they go, the first layers taking the remainder."""
    q = np.full(num_layers, num_slots // num_layers, dtype=np.int64)
    q[: num_slots % num_layers] += 1
    return q


def donor_layer(li: int, over: list[int], can: list[bool]) -> int | None:
    """The layer that gives layer li a slot, from each layer's excess over its quota and whether it has an
    evictable expert (can): li under its quota takes from the layer most over its quota that can, the first of
    equals; else li gives its own if it can; else whichever layer can, the most over its quota first."""
    if over[li] < 0:
        giving = [j for j in range(len(over)) if over[j] > 0 and can[j]]
        if giving:
            return max(giving, key=over.__getitem__)
    if can[li]:
        return li
    giving = [j for j in range(len(over)) if can[j]]
    return max(giving, key=over.__getitem__) if giving else None
