"""Belady's optimal cache: the fewest misses any cache of a given number of slots could take on a known use
sequence (evict the entry whose next use is farthest away). The yardstick the live cache, its replay and the
benchmarks' floors are measured against."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence


def belady_misses(uses: list[tuple[int, int]], num_slots: int, count_from: int = 0,
                  initial: Iterable[tuple[int, int]] = (), counted: Sequence[bool] | None = None) -> int:
    """Misses of an optimal cache of `num_slots` over `uses`, counting those at index >= count_from (or,
    given `counted`, those at the indices it marks True).

    `initial`: the keys resident before the first use (at most num_slots of them), e.g. what a live cache
    held when the span being bounded began; an empty cache by default."""
    next_use: list[float] = [0.0] * len(uses)
    seen: dict[tuple[int, int], float] = {}
    for i in range(len(uses) - 1, -1, -1):
        next_use[i] = seen.get(uses[i], float("inf"))
        seen[uses[i]] = i
    resident: dict[tuple[int, int], float] = {}  # key -> its next use
    heap: list[tuple[float, tuple[int, int]]] = []  # (-next use, key), stale entries skipped
    for key in initial:
        resident[key] = seen.get(key, float("inf"))  # `seen` now holds every key's first use
        heapq.heappush(heap, (-resident[key], key))
    if len(resident) > num_slots:
        raise ValueError(f"{len(resident)} keys resident at the start, over {num_slots} slots")
    misses = 0
    for i, key in enumerate(uses):
        if key in resident:
            resident[key] = next_use[i]
        else:
            if (counted[i] if counted is not None else i >= count_from):
                misses += 1
            if len(resident) >= num_slots:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg:
                        del resident[victim]
                        break
            resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return misses
