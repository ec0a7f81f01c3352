"""TransferEngine: copies expert buffers from the host store into device slots.

On CUDA every fill runs on one dedicated copy stream; each batch of fills records one event,
which every slot it filled keeps. The compute stream waits only on the events of the slots
it is about to read, so a layer whose experts are resident never waits, and no device-wide
synchronisation happens per expert.
A slot is refilled only after the compute that last read it has finished (its read event).

Demand misses are issued at once; prefetches queue in software and are issued in order
behind them, so a demand miss never waits behind more than the prefetches already issued.
A queued prefetch whose prediction went stale can be cancelled before it is issued.

On the CPU the same calls copy synchronously and the wait is the copy itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from enum import IntEnum

import torch


class Priority(IntEnum):
    DEMAND = 0
    PREFETCH = 1


class TransferEngine:
    def __init__(self, device: torch.device, num_slots: int):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._fill_done: list[torch.cuda.Event | None] = [None] * num_slots
        self._read_done: list[torch.cuda.Event | None] = [None] * num_slots
        self._queued: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # slot -> (dst, src)
        self._stall_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_cpu: dict[int, float] = {}

    def copy_many(self, loads: list[tuple[int, torch.Tensor, torch.Tensor]], priority: Priority,
                  tag: int = -1) -> None:
        """Fill slots from host buffers: `loads` is [(slot, device view, host buffer)].

        Each host buffer is a row of the ExpertStore, which lives as long as the engine, so it
        outlives the asynchronous copy without a reference being held here.
        """
        if priority == Priority.PREFETCH:
            for slot, dst, src in loads:
                self._queued[slot] = (dst, src)
            return
        for slot, _, _ in loads:
            self._queued.pop(slot, None)
        self._issue(loads, tag)

    def _issue(self, loads: list[tuple[int, torch.Tensor, torch.Tensor]], tag: int) -> None:
        if not loads:
            return
        if not self.is_cuda:
            t0 = time.perf_counter()
            for _, dst, src in loads:
                dst.copy_(src)
            if tag >= 0:  # a demand fill on the CPU is a stall for the layer that waits on it
                self._stall_cpu[tag] = self._stall_cpu.get(tag, 0.0) + time.perf_counter() - t0
            return
        with torch.cuda.stream(self.stream):
            waited = set()
            for slot, dst, src in loads:
                read = self._read_done[slot]
                if read is not None and id(read) not in waited:
                    self.stream.wait_event(read)
                    waited.add(id(read))
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()  # one event marks every fill of this batch
            done.record(self.stream)
        for slot, _, _ in loads:
            self._fill_done[slot] = done

    def issue_prefetches(self, limit: int | None = None) -> int:
        """Issue up to `limit` queued prefetches (all if None); returns how many were issued."""
        batch = []
        while self._queued and (limit is None or len(batch) < limit):
            slot, (dst, src) = self._queued.popitem(last=False)
            batch.append((slot, dst, src))
        self._issue(batch, tag=-1)
        return len(batch)

    def cancel(self, slot: int) -> bool:
        """Drop a queued, not yet issued, prefetch into `slot`."""
        return self._queued.pop(slot, None) is not None

    def is_queued(self, slot: int) -> bool:
        return slot in self._queued

    def wait_for(self, slots: list[int], tag: int) -> None:
        """Make the current (compute) stream wait until `slots` are filled."""
        # a prefetch not yet issued is needed now: promote it
        self._issue([(s, *self._queued.pop(s)) for s in slots if s in self._queued], tag)
        if not self.is_cuda:
            return
        pending = [s for s in slots if self._fill_done[s] is not None]
        if not pending:
            return
        compute = torch.cuda.current_stream(self.device)
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

    def mark_read(self, slots: list[int]) -> None:
        """Record that the compute just enqueued reads `slots`; a refill must wait for it."""
        if not self.is_cuda or not slots:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
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

    def reset(self) -> None:
        """Forget every fill: wait for the issued ones, drop the queued prefetches. Read events are kept, so
        a later fill still waits for any compute that reads its slot."""
        self.synchronize()
        self._queued.clear()
        self._fill_done = [None] * len(self._fill_done)
