"""TransferEngine: copies expert buffers from the host store into device slots.

On CUDA fills run on two dedicated copy streams, one for demand misses and one for prefetches; each
batch of fills records one event, which every slot it filled keeps. The compute stream waits only on
the events of the slots it is about to read, so a layer whose experts are resident never waits, and no
device-wide synchronisation happens per expert.
A slot is refilled only after the compute that last read it has finished (its read event), and after
its last fill, when that ran on the other stream.

Demand misses are issued at once; prefetches queue in software, ordered by deadline (the MoE
layer that will need them, earliest first) and then by score (most likely first), and are issued
a few at a time. A queued prefetch whose prediction went stale can be cancelled before it is issued.
Issued prefetches run on their own stream, so a demand miss does not wait behind them: the two streams'
copies run side by side on the GPU's copy engines and share the host link
(`separate_demand = False` puts both on one stream, in issue order, for comparison).

On the CPU the same calls copy synchronously and the wait is the copy itself.
"""

from __future__ import annotations

import heapq
import itertools
import time
from enum import IntEnum

import torch


class Priority(IntEnum):
    DEMAND = 0
    PREFETCH = 1


class TransferEngine:
    def __init__(self, device: torch.device, num_slots: int):
        self.is_cuda = device.type == "cuda"
        if self.is_cuda and device.index is None:  # torch.cuda's calls are slow to resolve a device without one
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        # the stream the engine computes on, taken once a step (follow_current_stream) rather than looked up at
        # every call: torch.cuda spends several microseconds of host time on each lookup, a few dozen a layer
        self.compute = torch.cuda.current_stream(device) if self.is_cuda else None
        self.stream = torch.cuda.Stream(device) if self.is_cuda else None  # prefetches
        # demand misses: their own stream, at the highest priority CUDA gives a stream
        self.demand_stream = torch.cuda.Stream(device, priority=-1) if self.is_cuda else None
        self.separate_demand = True
        self._fill_done: list[torch.cuda.Event | None] = [None] * num_slots
        # every slot's last fill and the stream it ran on, kept after the compute has waited for it: a fill on the
        # other stream must not overtake it
        self._last_fill: list[tuple[torch.cuda.Event, torch.cuda.Stream] | None] = [None] * num_slots
        self._read_done: list[torch.cuda.Event | None] = [None] * num_slots
        self._queued: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # slot -> (ticket, dst, src)
        self._order: list[tuple[int, float, int, int]] = []  # heap of (deadline, -score, ticket, slot)
        self._tickets = itertools.count()
        self._stall_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_cpu: dict[int, float] = {}

    def copy_many(self, loads: list[tuple[int, torch.Tensor, torch.Tensor]], priority: Priority,
                  tag: int = -1, deadline: int = 0, scores: list[float] | None = None) -> None:
        """Fill slots from host buffers: `loads` is [(slot, device view, host buffer)].

        Demand loads are issued now. Prefetches queue, ordered by `deadline` and then `scores` (one per
        load, higher first). Each host buffer is a row of the ExpertStore, which lives as long as the
        engine, so it outlives the asynchronous copy without a reference being held here.
        """
        if priority == Priority.PREFETCH:
            for i, (slot, dst, src) in enumerate(loads):
                ticket = next(self._tickets)
                self._queued[slot] = (ticket, dst, src)
                heapq.heappush(self._order, (deadline, -(scores[i] if scores else 0.0), ticket, slot))
            return
        for slot, _, _ in loads:
            self._queued.pop(slot, None)
        self._issue(loads, tag, Priority.DEMAND)

    def _issue(self, loads: list[tuple[int, torch.Tensor, torch.Tensor]], tag: int, priority: Priority) -> None:
        if not loads:
            return
        if not self.is_cuda:
            t0 = time.perf_counter()
            for _, dst, src in loads:
                dst.copy_(src)
            if tag >= 0:  # a demand fill on the CPU is a stall for the layer that waits on it
                self._stall_cpu[tag] = self._stall_cpu.get(tag, 0.0) + time.perf_counter() - t0
            return
        # onto the copy stream and back by hand: `with torch.cuda.stream(...)` looks the current device up on
        # every entry, which costs more host time than the copies' own calls
        stream = self.demand_stream if priority == Priority.DEMAND and self.separate_demand else self.stream
        torch.cuda.set_stream(stream)
        try:
            waited = set()
            for slot, dst, src in loads:
                read, last = self._read_done[slot], self._last_fill[slot]
                for event in (read, None if last is None or last[1] is stream else last[0]):
                    if event is not None and id(event) not in waited:
                        stream.wait_event(event)
                        waited.add(id(event))
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()  # one event marks every fill of this batch
            done.record(stream)
        finally:
            torch.cuda.set_stream(self.compute)
        for slot, _, _ in loads:
            self._fill_done[slot] = done
            self._last_fill[slot] = (done, stream)

    def follow_current_stream(self) -> None:
        """Compute on the stream current now: the engine calls this before each step, so that moeflow run under a
        caller's own stream orders its copies against that stream."""
        if self.is_cuda:
            self.compute = torch.cuda.current_stream(self.device)

    def issue_prefetches(self, limit: int | None = None) -> list[int]:
        """Issue up to `limit` queued prefetches (all if None), earliest deadline first; returns their slots."""
        batch = []
        while self._order and (limit is None or len(batch) < limit):
            _, _, ticket, slot = heapq.heappop(self._order)
            entry = self._queued.get(slot)
            if entry is None or entry[0] != ticket:  # cancelled, or queued again since
                continue
            del self._queued[slot]
            batch.append((slot, entry[1], entry[2]))
        self._issue(batch, -1, Priority.PREFETCH)
        return [slot for slot, _, _ in batch]

    @property
    def num_queued(self) -> int:
        return len(self._queued)

    def queued_slots(self) -> list[int]:
        return list(self._queued)

    def cancel(self, slot: int) -> bool:
        """Drop a queued, not yet issued, prefetch into `slot`."""
        dropped = self._queued.pop(slot, None) is not None
        if not self._queued:
            self._order.clear()  # only cancelled entries were left
        return dropped

    def is_queued(self, slot: int) -> bool:
        return slot in self._queued

    def wait_for(self, slots: list[int], tag: int) -> list[int]:
        """Make the current (compute) stream wait until `slots` are filled. Returns the slots whose queued
        prefetch had to be issued now (promoted to demand)."""
        promoted = [s for s in slots if s in self._queued]
        self._issue([(s, *self._queued.pop(s)[1:]) for s in promoted], tag, Priority.DEMAND)
        if not self.is_cuda:
            return promoted
        pending = [s for s in slots if self._fill_done[s] is not None]
        if not pending:
            return promoted
        compute = self.compute
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        waited = set()
        for s in pending:
            event = self._fill_done[s]
            if id(event) not in waited:
                compute.wait_event(event)
                waited.add(id(event))
            self._fill_done[s] = None
        end.record(compute)
        self._stall_events.append((tag, start, end))
        return promoted

    def mark_read(self, slots: list[int]) -> None:
        """Record that the compute just enqueued reads `slots`; a refill must wait for it."""
        if not self.is_cuda or not slots:
            return
        event = torch.cuda.Event()
        event.record(self.compute)
        for s in slots:
            self._read_done[s] = event

    def drain_stalls(self) -> dict[int, float]:
        """Seconds the compute stream spent waiting, per tag, since the last drain.

        On CUDA call this only after the compute stream has been synchronised.
        """
        out = self._stall_cpu
        self._stall_cpu = {}
        for tag, start, end in self._stall_events:
            out[tag] = out.get(tag, 0.0) + start.elapsed_time(end) / 1e3
        self._stall_events.clear()
        return out

    def synchronize(self) -> None:
        if self.is_cuda:
            self.stream.synchronize()
            self.demand_stream.synchronize()

    def reset(self) -> None:
        """Forget every fill: wait for the issued ones, drop the queued prefetches. Read events are kept, so
        a later fill still waits for any compute that reads its slot."""
        self.synchronize()
        self._queued.clear()
        self._order.clear()
        self._fill_done = [None] * len(self._fill_done)
        self._last_fill = [None] * len(self._last_fill)
