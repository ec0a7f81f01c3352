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


def belady_grouped_misses(groups: list[list[tuple[int, int]]], num_slots: int) -> int:
    """Misses of Belady's rule when each group's keys must be resident together, as a layer-step's experts are
    for the one expert kernel that computes them: a group's missing keys are loaded, evicting the resident keys
    outside the group whose next use (counted in groups) is farthest. belady_misses sees the same keys one by one
    and may evict a key the group used a moment ago to keep one a later group needs; this cannot. At batch 1 the
    two nearly agree; at batch 8 and 25% of moeflow-tiny's experts this takes about 12% more misses
    (tools/belady_bounds.py). A group larger than `num_slots` is taken in rounds of at most `num_slots` keys, the
    resident ones first, as the engine computes such a layer (CachedExperts.run_rounds)."""
    next_use: list[dict[tuple[int, int], float]] = [{}] * len(groups)
    seen: dict[tuple[int, int], float] = {}
    for g in range(len(groups) - 1, -1, -1):
        next_use[g] = {k: seen.get(k, float("inf")) for k in groups[g]}
        for k in groups[g]:
            seen[k] = g
    resident: dict[tuple[int, int], float] = {}  # key -> its next use
    misses = 0
    for g, keys in enumerate(groups):
        keys = list(dict.fromkeys(keys))
        keys.sort(key=lambda k: k not in resident)  # resident first, then in the given order
        for start in range(0, len(keys), num_slots):
            group = set(keys[start : start + num_slots])
            need = [k for k in group if k not in resident]
            misses += len(need)
            over = len(resident) + len(need) - num_slots
            if over > 0:
                outside = sorted(((v, k) for k, v in resident.items() if k not in group), reverse=True)
                for _, k in outside[:over]:
                    del resident[k]
            for k in group:
                resident[k] = next_use[g][k]
    return misses
