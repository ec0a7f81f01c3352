"""Eviction policies for the expert cache.

A policy only ranks; the cache decides which layer gives up a slot (by per-layer quota)
and asks the policy which of that layer's unpinned experts should go.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

Key = tuple[int, int]  # (layer, expert)


class EvictionPolicy(Protocol):
    def touch(self, key: Key) -> None:
        """`key` was used (a hit) or just filled."""

    def forget(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: list[Key]) -> Key:
        """The candidate to evict; `candidates` is non-empty and all are resident and unpinned."""


class LRUPolicy:
    def __init__(self) -> None:
        # per layer, least recent first: candidates always come from one layer, so a victim
        # is found by scanning that layer's order only
        self._order: dict[int, OrderedDict[int, None]] = {}

    def touch(self, key: Key) -> None:
        order = self._order.setdefault(key[0], OrderedDict())
        order[key[1]] = None
        order.move_to_end(key[1])

    def forget(self, key: Key) -> None:
        self._order.get(key[0], {}).pop(key[1], None)

    def victim(self, candidates: list[Key]) -> Key:
        allowed = set(candidates)
        for layer in dict.fromkeys(k[0] for k in candidates):
            for expert in self._order.get(layer, ()):
                if (layer, expert) in allowed:
                    return layer, expert
        return candidates[0]


class LFUPolicy:
    """Least frequently used since it entered the cache; ties go to the least recent."""

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._recency = LRUPolicy()

    def touch(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._recency.touch(key)

    def forget(self, key: Key) -> None:
        self._count.pop(key, None)
        self._recency.forget(key)

    def victim(self, candidates: list[Key]) -> Key:
        least = min(self._count.get(k, 0) for k in candidates)
        return self._recency.victim([k for k in candidates if self._count.get(k, 0) == least])


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
