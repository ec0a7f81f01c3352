"""What an offloaded run could at best achieve: measured copy bandwidth, and optimal-cache misses.

The floor of an offloaded run is the time its expert bytes take over the measured pinned
host-to-device bandwidth plus the time the same steps take with every expert resident.
The Belady floor does the same for the misses an optimal cache of the same number of slots
would take on the same route trace (moeflow.experts.belady).
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch




def pinned_h2d_bandwidth(nbytes: int, device: torch.device, reps: int = 10) -> float:
    """Bytes per second of one plain pinned host-to-device copy of `nbytes`, median of `reps`."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[2:])
    return nbytes / times[len(times) // 2]


def expert_load_bandwidth(engine, reps: int = 5) -> float:
    """Bytes per second the expert cache's own demand path moves.

    Each rep starts the engine on an empty pool of one layer's worth of slots and `acquire`s every expert
    of a layer: one copy per expert on the transfer engine's copy stream, with the cache's bookkeeping,
    timed on the host from the call until the copy stream is idle. Median over `reps`. Read beside
    `pinned_h2d_bandwidth` of the same bytes; the engine's cache is left empty at that size afterwards.
    """
    import time

    from moeflow.config import CacheConfig, ExpertBudget

    E, nbytes = engine.spec.num_experts, engine.store.expert_bytes
    budget = ExpertBudget("bytes", E * nbytes)
    times = []
    for i in range(reps + 1):  # the first rep warms the allocator and the copy stream
        engine.reset_expert_cache(CacheConfig(budget=budget))
        cache = engine.cache
        layer = cache.layers[i % len(cache.layers)]
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        t = time.perf_counter()
        got = cache.acquire(layer, list(range(E)))
        cache.transfer.synchronize()
        times.append(time.perf_counter() - t)
        if len(got) != E:
            raise RuntimeError(f"expected {E} loads, got {len(got)}")
        cache.release(list(got.values()))
    times = sorted(times[1:])
    return E * nbytes / times[len(times) // 2]


def device_memory_bandwidth(device: torch.device, nbytes: int = 2**30, reps: int = 10) -> float:
    """Bytes per second a large device-to-device copy moves, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[2:])
    return 2 * nbytes / times[len(times) // 2]


def flatten(access_log: list[tuple[int, list[int]]]) -> list[tuple[int, int]]:
    """Per-layer expert sets, in step order, as one sequence of (layer, expert) uses."""
    return [(layer, e) for layer, experts in access_log for e in experts]


def lru_misses(uses: list[tuple[int, int]], slots_per_layer: dict[int, int], count_from: int = 0) -> int:
    """Misses of a per-layer LRU with fixed slots per layer, for comparison with the live cache."""
    order: dict[int, deque] = defaultdict(deque)
    misses = 0
    for i, (layer, e) in enumerate(uses):
        q = order[layer]
        if e in q:
            q.remove(e)
        else:
            if i >= count_from:
                misses += 1
            if len(q) >= slots_per_layer[layer]:
                q.popleft()
        q.append(e)
    return misses
