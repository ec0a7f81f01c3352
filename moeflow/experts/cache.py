"""ExpertCache: the device tier, a fixed pool of equal slots allocated once.

Shapes: L MoE layers, E experts per layer, S slots, each slot one expert (3*I*H elements).

The pool maps (layer, expert) -> slot. Every layer has a quota of slots (equal shares by
default; a planner may rebalance them by predicted demand each step). A layer under its quota
takes a slot from the layer most over its quota (quotas.py); a layer at its quota evicts one of its own
experts, chosen by the eviction policy, sparing the experts a planner protects and taking the
lowest of a planner's priorities first, when it has set any. A planner may share the slots by value
instead (`order.share_by_value`): a slot then comes from the least valuable evictable expert of any layer above
a floor. Slots a compute still reads are pinned and never evicted.

Where an expert lives has one authority, the host's `slot_of`, and the device's `slot_table` is
its image for the kernels. A slot whose prefetch is still queued (its copy not yet issued) is
assigned on the host but not shown on the device, so a compute enqueued against the table never
reads a slot before its fill is ordered ahead of it. `prepare_compute(layer)` brings the device
table up to date and makes the compute stream wait for the layer's filling slots; `computable`
says which experts a compute enqueued after it covers.

When the budget holds every expert, the pool is filled once at start-up with a fixed
mapping and the MoE layers read it through the device-side table with no host round trip.

The miss path and the planner's calls run on the host between a router and its experts, up to
hundreds of times a step, so what they ask is kept up to date as slots change rather than
recomputed: `_idle` (which experts eviction may take) and `_live` (the table the device shows).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from moeflow.experts.policies import EvictionPolicy
from moeflow.experts.eviction_order import EvictionOrder
from moeflow.experts.quotas import ValueVictims, donor_layer
from moeflow.experts.slot_table import DeviceSlotTable
from moeflow.experts.stats import CacheStats, LayerStats
from moeflow.experts.store import ExpertStore
from moeflow.experts.transfer import Priority, TransferEngine

FREE, QUEUED, LIVE = 0, 1, 2  # a slot's state: empty, prefetch assigned but not issued, filled or filling


class ExpertCache:
    # Prefetches go onto the copy stream a few at a time, after each layer's demand loads,
    # so a later demand miss queues behind at most this many of them.
    PREFETCHES_PER_LAYER = 2

    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: EvictionPolicy):
        self.store = store
        self.layers = store.layers
        self.num_experts = E = store.num_experts
        self.top_k = store.top_k
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
        self._slot_views = self.pool.unbind(0)  # each slot's row, made once rather than per copy
        self.transfer = TransferEngine(device, num_slots)
        self.fully_resident = num_slots >= L * E
        # the device's image of slot_of, so kernels map (layer, expert) -> slot without the host; uploaded
        # before a compute reads it (slot_table.py)
        self._device_table = DeviceSlotTable(L, E, device)
        self.slot_table = self._device_table.table
        self._empty(policy)
        if self.fully_resident:
            self._preload()

    def _empty(self, policy: EvictionPolicy) -> None:
        L, E, S = len(self.layers), self.num_experts, self.num_slots
        self.policy = policy
        self.slot_of = np.full((L, E), -1, dtype=np.int64)
        self.owner: list[tuple[int, int] | None] = [None] * S  # (layer, expert) per slot
        self._state = np.zeros(S, dtype=np.int8)
        self._pins = np.zeros(S, dtype=np.int64)
        self._idle = np.zeros((L, E), dtype=bool)  # resident and pinned by no compute: what eviction may take
        self._live = np.full((L, E), -1, dtype=np.int32)  # slot_of where the slot is LIVE, else -1: the device table
        self._unused_prefetch = np.zeros(S, dtype=bool)  # filled by a prefetch and not used since
        self._free = list(range(S - 1, -1, -1))
        self._held = np.zeros(L, dtype=np.int64)
        self.order = EvictionOrder(L, E, S)  # what a planner says to keep: quotas, protection, priorities
        self.stats = CacheStats({layer: LayerStats() for layer in self.layers})
        self._table_dirty = True

    def ordinal(self, layer: int) -> int:
        return self._ordinal[layer]

    # -- fully resident pools --------------------------------------------------------------

    def _preload(self) -> None:
        for layer in self.layers:
            li = self._ordinal[layer]
            for e in range(self.num_experts):
                slot = li * self.num_experts + e  # the order layer_weights reads
                self._slot_views[slot].copy_(self.store.get(layer, e), non_blocking=True)
                self._assign(slot, layer, e)
                self._go_live(slot)
        self._free.clear()
        self.stats.preload_bytes = len(self.layers) * self.num_experts * self.expert_bytes
        self.upload_slot_table()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fully resident pool's (w_gate_up, w_down) views of `layer`'s experts, indexed by expert id: _preload
        puts expert e of the layer with ordinal li in slot li * E + e, so the slice needs no slot table."""
        if not self.fully_resident:
            raise RuntimeError("expert cache: only a fully resident pool holds each layer's experts in order")
        first = self._ordinal[layer] * self.num_experts
        return self.w_gate_up[first : first + self.num_experts], self.w_down[first : first + self.num_experts]

    def count_resident_step(self, used: np.ndarray) -> None:
        """A fully resident pool's hits, from a step's RouteRecord: used [L, E], each layer's distinct experts."""
        for layer, n in zip(self.layers, used.sum(axis=1).tolist()):
            self.stats.per_layer[layer].hits += n

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
        self._empty(policy)
        self.upload_slot_table()

    def acquire(self, layer: int, experts: list[int]) -> dict[int, int]:
        """Make as many of `experts` resident as the pool allows and pin them.

        Returns {expert: slot} for those acquired (all already-resident ones first, then
        loads in the given order). The caller computes with them, calls `release`, and asks
        again for the rest. The compute stream is made to wait for the loads it needs, and
        the device slot table shows them.
        """
        li = self._ordinal[layer]
        stats = self.stats.per_layer[layer]
        got: dict[int, int] = {}
        missing = []
        for e, slot in zip(experts, self.slot_of[li, experts].tolist()):
            if slot >= 0:
                got[e] = slot
                self._pin(slot, li, e)
                self.policy.touch(li, e)
                if self._unused_prefetch[slot]:
                    self._unused_prefetch[slot] = False
                    stats.prefetch_hits += 1
            else:
                missing.append(e)
        stats.hits += len(got)
        loads = []
        take = self._take_slots(li, got if self.order.after_use is not None else None)
        for e in missing:
            slot = next(take)
            if slot is None:
                break
            self._assign(slot, layer, e)
            self._go_live(slot)
            got[e] = slot
            self._pin(slot, li, e)
            self.policy.touch(li, e)
            loads.append((slot, self._slot_views[slot], self.store.get(layer, e)))
        stats.misses += len(loads)
        stats.bytes_moved += len(loads) * self.expert_bytes
        self.transfer.copy_many(loads, Priority.DEMAND, tag=layer)
        self._went_live(self.transfer.wait_for(list(got.values()), tag=layer))
        self.issue_prefetches(self.PREFETCHES_PER_LAYER)
        self.upload_slot_table()
        return got

    def release(self, slots: list[int], spent: bool = False, read: list[int] | None = None) -> None:
        """Unpin `slots` once the compute that reads them is enqueued. `spent`: their layer has computed them
        for this step (EvictionOrder.spend: with rounds by value on, a later round of the layer may evict them
        first). `read`: the other slots that compute reads, if any (a round computes again the picks of experts
        kept from an earlier round); a refill of any of them waits for it too."""
        self.transfer.mark_read(slots if not read else list(set(slots).union(read)))
        for s in slots:
            self._pins[s] -= 1
            owner = self.owner[s]
            if owner is not None and self._pins[s] == 0:
                li, e = self._ordinal[owner[0]], owner[1]
                self._idle[li, e] = True
                if spent:
                    self.order.spend(li, e)

    def prepare_compute(self, layer: int) -> None:
        """Before a compute that reads `layer`'s experts through the device table, enqueued before the host
        knows which it will read: bring the table up to date, and make the compute stream wait for the
        fills of every slot the table shows for the layer."""
        self.upload_slot_table()
        live = self._live[self._ordinal[layer]]
        self.transfer.wait_for(live[live >= 0].tolist(), tag=layer)

    def live_slots(self, layer: int, experts: list[int]) -> list[int]:
        """The slots the device table shows for `experts` of `layer`: what a compute enqueued now reads for them."""
        live = self._live[self._ordinal[layer], experts]
        return live[live >= 0].tolist()

    def computable(self, layer: int, experts: list[int]) -> bool:
        """Whether a compute enqueued after `prepare_compute(layer)` (and no cache change since) covered `experts`."""
        return bool((self._live[self._ordinal[layer], experts] >= 0).all())

    # -- planning: prefetches (what to keep is `order`, eviction_order.py) ----------------------

    def enqueue_prefetch(self, layer: int, experts: list[int], deadline: int = 0,
                         scores: list[float] | None = None) -> int:
        """Queue loads of predicted experts of `layer` (best first), to be issued before those of later deadlines.

        `deadline`: the MoE layer ordinal that will need them (the copy stream takes earlier deadlines first);
        `scores`: one per expert, higher first within a deadline. Takes free slots while the layer is under
        its quota, else evicts the layer's own unpinned experts that are neither predicted nor protected;
        returns how many loads were queued.
        """
        li = self._ordinal[layer]
        spare = None  # what may go for them: neither protected nor predicted (made at the first eviction)
        victims = None  # slots shared by value: what may go, least valuable first (made at the first eviction)
        order = self.order
        quota = int(order.quota[li])
        by_value = order.by_value
        loads, load_scores = [], []
        for i, e in enumerate(experts):
            if self.slot_of[li, e] >= 0:
                continue
            score = scores[i] if scores is not None else 0.0
            if self._free and (by_value or self._held[li] < quota):
                slot = self._free.pop()
            elif by_value:
                if victims is None:
                    victims = ValueVictims(li, self._idle, order.unprotected, self._held, order.floor, order.priority,
                                           self.policy, exclude=experts)
                victim = victims.take(below=order.margin * score)
                if victim is None:
                    break
                slot = int(self.slot_of[victim])
                self._evict(slot)
            else:
                if spare is None:
                    spare = order.unprotected[li].copy()
                    spare[experts] = False
                candidates = self._idle[li] & spare
                if not np.count_nonzero(candidates):  # (count_nonzero: a third of any()'s host time)
                    break
                slot = int(self.slot_of[li, order.choose(li, candidates, self.policy)])
                self._evict(slot)
            self._assign(slot, layer, e)
            self._state[slot] = QUEUED
            self._unused_prefetch[slot] = True
            self.policy.touch(li, e)
            loads.append((slot, self._slot_views[slot], self.store.get(layer, e)))
            load_scores.append(score)
        self.transfer.copy_many(loads, Priority.PREFETCH, deadline=deadline, scores=load_scores)
        return len(loads)

    def issue_prefetches(self, limit: int | None = None) -> int:
        """Start up to `limit` queued prefetches now (earliest deadline first); returns how many."""
        if not self.transfer.num_queued:
            return 0
        issued = self.transfer.issue_prefetches(limit)
        self._went_live(issued)
        return len(issued)

    def drop_prefetches(self, layer: int | None = None, experts: list[int] | None = None) -> int:
        """Cancel the queued (not yet issued) prefetches of `layer` (only of `experts`, if given), or of every
        layer: their slots go free."""
        dropped = 0
        for slot in self.transfer.queued_slots():
            owner = self.owner[slot]
            if owner is None or (layer is not None and owner[0] != layer):
                continue
            if experts is not None and owner[1] not in experts:
                continue
            self._evict(slot)
            self._free.append(slot)
            dropped += 1
        return dropped

    def residency(self) -> np.ndarray:
        """[L, E] bool: experts resident or on their way (a queued prefetch counts)."""
        return self.slot_of >= 0

    # -- the slot table ----------------------------------------------------------------------

    def upload_slot_table(self) -> None:
        """Bring the device's slot table up to date (on the current stream), if it changed. Slots whose
        prefetch is still queued show -1: nothing has ordered their fill ahead of a compute yet."""
        if not self._table_dirty:
            return
        self._device_table.upload(self._live, self.transfer.compute)
        self._table_dirty = False

    def _went_live(self, slots: list[int]) -> None:
        """Queued prefetches into `slots` were issued: the device table may show them from now on."""
        for s in slots:
            self._go_live(s)
            layer = self.owner[s][0]
            st = self.stats.per_layer[layer]
            st.prefetches += 1
            st.prefetch_bytes += self.expert_bytes

    # -- slots -------------------------------------------------------------------------------

    def _assign(self, slot: int, layer: int, expert: int) -> None:
        li = self._ordinal[layer]
        self.owner[slot] = (layer, expert)
        self.slot_of[li, expert] = slot
        self._idle[li, expert] = self._pins[slot] == 0
        self._held[li] += 1
        self._table_dirty = True

    def _go_live(self, slot: int) -> None:
        """The fill of an assigned slot is ordered (or done): the device table shows it from now on."""
        self._state[slot] = LIVE
        layer, expert = self.owner[slot]
        self._live[self._ordinal[layer], expert] = slot
        self._table_dirty = True

    def _pin(self, slot: int, li: int, expert: int) -> None:
        self._pins[slot] += 1
        self._idle[li, expert] = False

    def _evict(self, slot: int) -> None:
        layer, expert = self.owner[slot]
        li = self._ordinal[layer]
        if self._unused_prefetch[slot] and self._state[slot] == LIVE:
            self.stats.per_layer[layer].wasted_prefetches += 1
        self.owner[slot] = None
        self.slot_of[li, expert] = -1
        self._idle[li, expert] = False
        self._live[li, expert] = -1
        self._state[slot] = FREE
        self._unused_prefetch[slot] = False
        self._held[li] -= 1
        self._table_dirty = True
        self.policy.forget(li, expert)
        self.transfer.cancel(slot)  # a prefetch into it that was never issued is stale now

    def _victim(self, li: int) -> int:
        """The slot layer li gives up, which must have an evictable expert: an unprotected one if it has one."""
        candidates = self._idle[li]
        spare = candidates & self.order.unprotected[li]
        return int(self.slot_of[li, self.order.choose(li, spare if np.count_nonzero(spare) else candidates,
                                                      self.policy)])

    def _take_slots(self, li: int, got: dict[int, int] | None = None) -> Iterator[int | None]:
        """Slots for layer li's misses, one per next(): a free slot, or one freed by evicting an unpinned expert;
        None once every slot is pinned, or (rounds by value, `got`: what the layer holds so far) once the round
        should end before the next eviction.

        A layer at its quota evicts its own; a layer under it takes from the layers most over
        theirs. Only when those have nothing evictable does any other layer give a slot. Each
        slot given must be assigned to li before the next is asked for: the layers' excesses
        and whether each has anything evictable are then followed across takes, not recomputed.
        """
        while self._free:
            yield self._free.pop()
        order = self.order
        if order.by_value:
            victims = ValueVictims(li, self._idle, order.unprotected, self._held, order.floor, order.priority,
                                   self.policy)
            while (victim := victims.take()) is not None:
                if got is not None and order.round_ends(li, victim, got):
                    break
                slot = int(self.slot_of[victim])
                self._evict(slot)
                yield slot
            yield None
            return
        over = (self._held - order.quota).tolist()
        can = self._idle.any(axis=1).tolist()
        while True:
            j = donor_layer(li, over, can)
            if j is None:
                yield None
                return
            slot = self._victim(j)
            self._evict(slot)
            over[j] -= 1
            can[j] = np.count_nonzero(self._idle[j]) > 0
            yield slot
            over[li] += 1  # the caller assigned the slot to li

    # -- accounting ------------------------------------------------------------------------

    def collect_stats(self) -> CacheStats:
        """Fold the copy stream's timed waits into the stats; call after the compute stream is synchronised."""
        for layer, secs in self.transfer.drain_stalls().items():
            self.stats.per_layer[layer].stall_s += secs
        return self.stats

    def resident_count(self, layer: int) -> int:
        return int(self._held[self._ordinal[layer]])
