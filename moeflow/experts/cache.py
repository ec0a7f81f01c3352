"""ExpertCache: the device tier, a fixed pool of equal slots allocated once.

Shapes: L MoE layers, E experts per layer, S slots, each slot one expert (3*I*H elements).

The pool maps (layer, expert) -> slot. Every layer has a quota of slots (equal shares by
default; a predictor may rebalance them by demand). A layer under its quota takes a slot
from the layer most over its quota; a layer at its quota evicts one of its own experts,
chosen by the eviction policy. Slots a compute still reads are pinned and never evicted.

When the budget holds every expert, the pool is filled once at start-up with a fixed
mapping and the MoE layers read it through a device-side table with no host round trip.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from moeflow.experts.policies import EvictionPolicy
from moeflow.experts.stats import CacheStats, LayerStats
from moeflow.experts.store import ExpertStore
from moeflow.experts.transfer import Priority, TransferEngine


class ExpertCache:
    # Prefetches go onto the copy stream a few at a time, after each layer's demand loads,
    # so a later demand miss queues behind at most this many of them.
    PREFETCHES_PER_LAYER = 2

    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: EvictionPolicy):
        self.store = store
        self.layers = store.layers
        self.num_experts = E = store.num_experts
        self.num_slots = num_slots
        self.expert_bytes = store.expert_bytes
        self.device = device
        self.policy = policy
        L = len(self.layers)
        self._ordinal = {layer: i for i, layer in enumerate(self.layers)}
        self.pool = torch.empty(num_slots, store.numel, dtype=store.dtype, device=device)
        IH = store.width * store.hidden
        # strided views over the pool: slot s's gate_up is [2I, H], its down [H, I]
        self.w_gate_up = self.pool[:, : 2 * IH].view(num_slots, 2 * store.width, store.hidden)
        self.w_down = self.pool[:, 2 * IH :].view(num_slots, store.hidden, store.width)
        self.transfer = TransferEngine(device, num_slots)
        self.slot_of = np.full((L, E), -1, dtype=np.int64)
        self.owner: list[tuple[int, int] | None] = [None] * num_slots  # (layer, expert) per slot
        self._pins = np.zeros(num_slots, dtype=np.int64)
        self._free = list(range(num_slots - 1, -1, -1))
        self._held = np.zeros(L, dtype=np.int64)
        self.quota = self.equal_quotas(num_slots, L)
        self.stats = CacheStats({layer: LayerStats() for layer in self.layers})
        self.fully_resident = num_slots >= L * E
        # slot_of mirrored on the device, so kernels map (layer, expert) -> slot without the host;
        # uploaded after every change, through a ring of pinned staging buffers
        self.slot_table = torch.full((L, E), -1, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._staging = [torch.empty(L, E, dtype=torch.int32, pin_memory=pin) for _ in range(4 if pin else 1)]
        self._staging_done = [torch.cuda.Event() if pin else None for _ in self._staging]
        self._next_staging = 0
        self._table_dirty = False
        self._resident_hits: torch.Tensor | None = None
        if self.fully_resident:
            self._preload()

    @staticmethod
    def equal_quotas(num_slots: int, num_layers: int) -> np.ndarray:
        q = np.full(num_layers, num_slots // num_layers, dtype=np.int64)
        q[: num_slots % num_layers] += 1
        return q

    def ordinal(self, layer: int) -> int:
        return self._ordinal[layer]

    # -- fully resident pools --------------------------------------------------------------

    def _preload(self) -> None:
        for layer in self.layers:
            li = self._ordinal[layer]
            for e in range(self.num_experts):
                slot = li * self.num_experts + e
                self.pool[slot].copy_(self.store.get(layer, e), non_blocking=True)
                self._assign(slot, layer, e)
        self._free.clear()
        self.stats.preload_bytes = len(self.layers) * self.num_experts * self.expert_bytes
        self.upload_slot_table()
        self._resident_hits = torch.zeros(len(self.layers), dtype=torch.int64, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def count_resident_hits(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count a fully resident layer's distinct experts on the device, without a host sync."""
        used = torch.zeros(self.num_experts, dtype=torch.int64, device=self.device)
        used.index_fill_(0, topk_ids.flatten(), 1)
        self._resident_hits[self._ordinal[layer]] += used.sum()

    @contextmanager
    def uncounted(self):
        """Work done inside (a CUDA graph's warm-up run) leaves the device-side counters as they were."""
        saved = self._resident_hits.clone() if self._resident_hits is not None else None
        try:
            yield
        finally:
            if saved is not None:
                self._resident_hits.copy_(saved)

    # -- on-demand pools -------------------------------------------------------------------

    def clear(self, policy: EvictionPolicy) -> None:
        """Empty an on-demand pool in place, as a new one would start: every slot free, the slot table all -1,
        quotas equal, `policy` new, statistics zero. The pool's tensors keep their addresses, so CUDA graphs
        captured against them stay valid."""
        if self.fully_resident:
            raise RuntimeError("expert cache: a fully resident pool has a fixed mapping and is never emptied")
        if self._pins.any():
            raise RuntimeError("expert cache: cannot empty the pool while a compute holds some of its slots")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy or compute still touches the pool
        self.transfer.reset()
        self.transfer.drain_stalls()  # stalls of the old contents are not the new cache's
        self.policy = policy
        self.slot_of.fill(-1)
        self.owner = [None] * self.num_slots
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._held[:] = 0
        self.quota = self.equal_quotas(self.num_slots, len(self.layers))
        self.stats = CacheStats({layer: LayerStats() for layer in self.layers})
        self._table_dirty = True
        self.upload_slot_table()

    def acquire(self, layer: int, experts: list[int]) -> dict[int, int]:
        """Make as many of `experts` resident as the pool allows and pin them.

        Returns {expert: slot} for those acquired (all already-resident ones first, then
        loads in the given order). The caller computes with them, calls `release`, and asks
        again for the rest. The compute stream is made to wait for the loads it needs.
        """
        li = self._ordinal[layer]
        stats = self.stats.per_layer[layer]
        got: dict[int, int] = {}
        missing = []
        for e in experts:
            slot = int(self.slot_of[li, e])
            if slot >= 0:
                got[e] = slot
                self._pins[slot] += 1
                self.policy.touch(li, e)
            else:
                missing.append(e)
        stats.hits += len(got)
        loads = []
        for e in missing:
            slot = self._take_slot(li)
            if slot is None:
                break
            self._assign(slot, layer, e)
            got[e] = slot
            self._pins[slot] += 1
            self.policy.touch(li, e)
            loads.append((slot, self.pool[slot], self.store.get(layer, e)))
        stats.misses += len(loads)
        stats.bytes_moved += len(loads) * self.expert_bytes
        self.transfer.copy_many(loads, Priority.DEMAND, tag=layer)
        self.transfer.wait_for(list(got.values()), tag=layer)
        self.transfer.issue_prefetches(limit=self.PREFETCHES_PER_LAYER)
        self.upload_slot_table()
        return got

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Queue loads, at prefetch priority, of predicted experts of `layer` (best first).

        Takes free slots, else evicts this layer's own unpinned, unpredicted experts, and
        never grows the layer past its quota; returns how many loads were queued.
        """
        li = self._ordinal[layer]
        stats = self.stats.per_layer[layer]
        keep = np.zeros(self.num_experts, dtype=bool)
        keep[experts] = True
        loads = []
        for e in experts:
            if self.slot_of[li, e] >= 0:
                continue
            if self._free and self._held[li] < self.quota[li]:
                slot = self._free.pop()
            else:
                candidates = self._evictable(li) & ~keep
                if not candidates.any():
                    break
                slot = int(self.slot_of[li, self.policy.victim(li, candidates)])
                self._evict(slot)
            self._assign(slot, layer, e)
            self.policy.touch(li, e)
            loads.append((slot, self.pool[slot], self.store.get(layer, e)))
        stats.prefetches += len(loads)
        stats.prefetch_bytes += len(loads) * self.expert_bytes
        self.transfer.copy_many(loads, Priority.PREFETCH)
        return len(loads)

    def all_resident(self, layer: int, experts: list[int]) -> bool:
        return bool((self.slot_of[self._ordinal[layer], experts] >= 0).all())

    def await_resident(self, layer: int) -> None:
        """Make the compute stream wait until every resident expert of `layer` is filled.

        For a compute enqueued before the host knows which of them it will read.
        """
        li = self._ordinal[layer]
        self.transfer.wait_for([int(s) for s in self.slot_of[li][self.slot_of[li] >= 0]], tag=layer)

    def upload_slot_table(self) -> None:
        """Bring the device's slot table up to date with the host's (on the current stream), if it changed."""
        if not self._table_dirty:
            return
        i = self._next_staging
        self._next_staging = (i + 1) % len(self._staging)
        done = self._staging_done[i]
        if done is not None:
            done.synchronize()  # the copy that last read this staging buffer has run
        np.copyto(self._staging[i].numpy(), self.slot_of, casting="unsafe")
        self.slot_table.copy_(self._staging[i], non_blocking=done is not None)
        if done is not None:
            done.record()
        self._table_dirty = False

    def release(self, slots: list[int]) -> None:
        self.transfer.mark_read(slots)
        for s in slots:
            self._pins[s] -= 1

    def _assign(self, slot: int, layer: int, expert: int) -> None:
        li = self._ordinal[layer]
        self.owner[slot] = (layer, expert)
        self.slot_of[li, expert] = slot
        self._held[li] += 1
        self._table_dirty = True

    def _evict(self, slot: int) -> None:
        layer, expert = self.owner[slot]
        li = self._ordinal[layer]
        self.owner[slot] = None
        self.slot_of[li, expert] = -1
        self._held[li] -= 1
        self._table_dirty = True
        self.policy.forget(li, expert)
        self.transfer.cancel(slot)  # a prefetch into it that was never issued is stale now

    def _evictable(self, li: int) -> np.ndarray:
        """Bool mask over layer li's experts: resident and not pinned by a compute in flight."""
        slots = self.slot_of[li]
        return (slots >= 0) & (self._pins[np.maximum(slots, 0)] == 0)

    def _take_slot(self, li: int) -> int | None:
        """A free slot, or one freed by evicting an unpinned expert; None if every slot is pinned.

        A layer at its quota evicts its own; a layer under it takes from the layers most over
        theirs. Only when those have nothing evictable does any other layer give a slot.
        """
        if self._free:
            return self._free.pop()
        over = self._held - self.quota
        by_excess = sorted(range(len(self.layers)), key=lambda j: -over[j])
        preferred = [li] if over[li] >= 0 else [j for j in by_excess if over[j] > 0] + [li]
        for j in preferred + by_excess:
            candidates = self._evictable(j)
            if candidates.any():
                slot = int(self.slot_of[j, self.policy.victim(j, candidates)])
                self._evict(slot)
                return slot
        return None

    # -- accounting ------------------------------------------------------------------------

    def collect_stats(self) -> CacheStats:
        """Fold device-side counters into the stats; call after the compute stream is synchronised."""
        for layer, secs in self.transfer.drain_stalls().items():
            self.stats.per_layer[layer].stall_s += secs
        if self._resident_hits is not None:
            counts = self._resident_hits.tolist()
            self._resident_hits.zero_()
            for layer, n in zip(self.layers, counts):
                self.stats.per_layer[layer].hits += int(n)
        return self.stats

    def resident_count(self, layer: int) -> int:
        return int(self._held[self._ordinal[layer]])
