"""How an expert cache's slots are shared between its MoE layers.

By quota (the default): every layer has a quota of slots (equal by default; a planner may set them per step).
When a layer needs a slot and none is free, `donor_layer` says which layer gives one up: the cache then evicts
from that layer. By value (a planner's choice, `ExpertCache.order.share_by_value`): the slot comes from the least
valuable evictable expert of any layer above a floor, `least_valuable`; `ValueVictims` makes the same picks over
a run of evictions (one acquire, one prefetch) without making the candidates again for each.
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
    return ValueVictims(li, idle, unprotected, held, floor, priority, policy, exclude).take(below)


def _pick(ties: np.ndarray, n: int, policy) -> tuple[int, int]:
    """The one of `n` equals ([L, E] mask) to evict: the eviction policy's choice when there are several."""
    if n == 1:
        return divmod(int(ties.argmax()), ties.shape[1])
    return policy.victim_anywhere(ties)


class ValueVictims:
    """least_valuable's picks for layer li over one run of evictions (one acquire, one enqueue_prefetch), one per
    `take`, for a cache that between two takes changes only by evicting the expert the last take returned and
    filling layer li (its new experts pinned or in `exclude`).

    Candidates then only leave the run (evicted, or their layer may give no more), never join it. So the values
    of the candidates a take made are kept, and each pick, and each layer that may give no more, is struck out of
    them: the next least are found there, without the candidates made again. The least are kept too, as a mask
    and a count, until the last of them has left. `idle` and `held` are read as the cache changes them."""

    __slots__ = ("li", "idle", "unprotected", "held", "floor", "priority", "policy", "exclude", "_values",
                 "_protected", "_ties", "_left", "_lowest", "_taken")

    def __init__(self, li: int, idle: np.ndarray, unprotected: np.ndarray, held: np.ndarray, floor: int,
                 priority: np.ndarray, policy, exclude: list[int] | None = None):
        self.li, self.idle, self.unprotected, self.held, self.floor = li, idle, unprotected, held, floor
        self.priority, self.policy, self.exclude = priority, policy, exclude
        self._values: np.ndarray | None = None  # [L, E] the kept candidates' values, inf elsewhere; None: none kept
        self._protected = False  # whether they are protected ones (no unprotected one was left)
        self._ties: np.ndarray | None = None  # [L, E] the least of them still in the run
        self._left = 0  # how many
        self._lowest = 0.0  # their value
        self._taken: tuple[int, int] | None = None  # the last pick, gone by the next take

    def take(self, below: float | None = None) -> tuple[int, int] | None:
        """least_valuable(li, idle, unprotected, held, floor, priority, policy, exclude, below) as the cache
        stands now."""
        if self._taken is not None:
            self._forget(*self._taken)
            if not self._left and self._values is not None:
                lowest = self._values.min()
                if lowest < np.inf:
                    self._ties = self._values == lowest
                    self._left, self._lowest = int(np.count_nonzero(self._ties)), lowest
                else:  # none left (or only infinite or NaN values): the candidates made again
                    self._values = None
        if not self._left:
            return self._from_cache(below)
        if below is not None and (self._protected or self._lowest >= below):
            return None
        self._taken = victim = _pick(self._ties, self._left, self.policy)
        return victim

    def _from_cache(self, below: float | None) -> tuple[int, int] | None:
        """least_valuable's own pass: the candidates made from the cache as it stands, kept for the next takes."""
        li, idle, held, priority = self.li, self.idle, self.held, self.priority
        may_give = held > self.floor
        may_give[li] = held[li] > 0
        candidates = idle & may_give[:, None]
        if self.exclude is not None:
            candidates[li, self.exclude] = False
        spare = candidates & self.unprotected
        protected = not np.count_nonzero(spare)
        if not protected:
            candidates = spare
        elif below is not None:
            return None
        elif not np.count_nonzero(candidates):
            if not idle.any():
                return None
            candidates = idle  # every layer at its floor: any evictable expert, so that a miss is always served
        values = np.where(candidates, priority, np.inf)
        lowest = values.min()
        if below is not None and lowest >= below:
            return None
        ties = values == lowest
        left = int(np.count_nonzero(ties))
        victim = _pick(ties, left, self.policy)
        if candidates is not idle and lowest < np.inf:
            # kept unless these candidates ignore the floor, or the mask of an infinite (or NaN) value holds others
            self._values, self._protected, self._ties, self._left, self._lowest = values, protected, ties, left, lowest
            self._taken = victim
        return victim

    def _forget(self, j: int, expert: int) -> None:
        """The last pick, expert `expert` of layer j, left the cache: strike it out, and its layer too once that
        may give no more (down to the floor; li once it holds none)."""
        self._taken = None
        if self.idle[j, expert]:  # not evicted after all: the candidates made again
            self._values, self._left = None, 0
            return
        self._values[j, expert] = np.inf
        self._ties[j, expert] = False
        self._left -= 1
        if self.held[j] <= (0 if j == self.li else self.floor):
            self._values[j] = np.inf
            if self._left:
                self._left -= int(np.count_nonzero(self._ties[j]))
                self._ties[j] = False
