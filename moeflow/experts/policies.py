"""Eviction policies for the expert cache.

A policy only ranks; the cache decides which layer gives up a slot (by per-layer quota)
and asks the policy which of that layer's evictable experts should go (or, when a planner shares slots
by value, which of equally valued experts of any layer). Rankings live in
[layer, expert] arrays, so choosing a victim is one vectorised pass over a layer's experts
rather than a Python loop: the miss path runs hundreds of times per step at large batches.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

_NEVER = np.iinfo(np.int64).max  # a rank no candidate has: non-candidates never win the argmin


class EvictionPolicy(Protocol):
    def touch(self, li: int, expert: int) -> None:
        """Expert `expert` of the layer with ordinal `li` was used (a hit) or just filled."""

    def forget(self, li: int, expert: int) -> None:
        """The expert left the cache."""

    def victim(self, li: int, candidates: np.ndarray) -> int:
        """The expert to evict among `candidates` (a bool mask over the layer's experts, not all False)."""

    def victim_anywhere(self, candidates: np.ndarray) -> tuple[int, int]:
        """(layer ordinal, expert) to evict among `candidates`, a bool mask [L, E] over every layer, not all False."""


class LRUPolicy:
    def __init__(self, num_layers: int, num_experts: int):
        self._last = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._tick = 0

    def touch(self, li: int, expert: int) -> None:
        self._tick += 1
        self._last[li, expert] = self._tick

    def forget(self, li: int, expert: int) -> None:
        self._last[li, expert] = 0

    def victim(self, li: int, candidates: np.ndarray) -> int:
        return int(np.where(candidates, self._last[li], _NEVER).argmin())

    def victim_anywhere(self, candidates: np.ndarray) -> tuple[int, int]:
        flat = int(np.where(candidates, self._last, _NEVER).argmin())  # one clock for every layer
        return divmod(flat, candidates.shape[1])


class LFUPolicy:
    """Least frequently used since it entered the cache; ties go to the least recently used."""

    def __init__(self, num_layers: int, num_experts: int):
        self._count = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._recency = LRUPolicy(num_layers, num_experts)

    def touch(self, li: int, expert: int) -> None:
        self._count[li, expert] += 1
        self._recency.touch(li, expert)

    def forget(self, li: int, expert: int) -> None:
        self._count[li, expert] = 0
        self._recency.forget(li, expert)

    def victim(self, li: int, candidates: np.ndarray) -> int:
        counts = np.where(candidates, self._count[li], _NEVER)
        return self._recency.victim(li, candidates & (counts == counts.min()))

    def victim_anywhere(self, candidates: np.ndarray) -> tuple[int, int]:
        counts = np.where(candidates, self._count, _NEVER)
        return self._recency.victim_anywhere(candidates & (counts == counts.min()))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str, num_layers: int, num_experts: int) -> EvictionPolicy:
    return POLICIES[name](num_layers, num_experts)
