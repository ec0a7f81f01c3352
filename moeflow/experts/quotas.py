"""How an expert cache's slots are shared between its MoE layers.

By quota (the default): every layer has a quota of slots (equal by default; a planner may set them per step).
When a layer needs a slot and none is free, `donor_layer` says which layer gives one up: the cache then evicts
from that layer. By value (a planner's choice, `ExpertCache.order.share_by_value`): the slot comes from the least
valuable evictable expert of any layer above a floor, `least_valuable`.
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


def least_valuable(li: int, idle: np.ndarray, unprotected: np.ndarray, held: np.ndarray, floor: int,
                   priority: np.ndarray, policy, exclude: list[int] | None = None,
                   below: float | None = None) -> tuple[int, int] | None:
    """When a planner shares slots by value instead of by quota: the (layer ordinal, expert) that gives layer li
    a slot, the least valuable (`priority` [L, E]) of the evictable experts (`idle` [L, E]) of li itself or of any
    layer holding more than `floor` slots, unprotected ones first; equals go to the eviction policy, across layers.

    `exclude`: experts of li that may not go (those being loaded); `below`: a prefetch's bound, only an unprotected
    expert worth less than this may go for it, and None is returned when there is none."""
    may_give = held > floor
    may_give[li] = held[li] > 0
    candidates = idle & may_give[:, None]
    if exclude is not None:
        candidates[li, exclude] = False
    spare = candidates & unprotected
    if np.count_nonzero(spare):
        candidates = spare
    elif below is not None:
        return None
    elif not np.count_nonzero(candidates):
        if not idle.any():
            return None
        candidates = idle  # every layer at its floor: any evictable expert, so that a miss is always served
    p = np.where(candidates, priority, np.inf)
    lowest = p.min()
    if below is not None and lowest >= below:
        return None
    ties = p == lowest
    if np.count_nonzero(ties) == 1:
        return divmod(int(ties.argmax()), ties.shape[1])
    return policy.victim_anywhere(ties)
