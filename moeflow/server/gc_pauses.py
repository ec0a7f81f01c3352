"""The server's garbage-collector pauses: the start-up heap frozen, every collection timed.

Python's cyclic collector stops every thread while it runs, the engine's included, and a full (generation 2)
collection walks every tracked object the process holds. A server's heap after start-up is mostly what will
live as long as it does (torch, the model's modules and weights' wrappers, compiled kernels, captured graphs,
the web framework): a process holding the bundled model's engine on the CPU tracks about 175,000 objects, and a
full collection of them takes about 66 ms on this project's CPU machine (tools/gc_pause_ab.py). A collection
comes at an allocation count, so it lands inside whatever step is running. `freeze_start_up_heap` collects once and moves everything alive into the collector's permanent
generation, so later collections walk only what serving allocates (the practice of vLLM's server too).

`GCPauses` times every collection through `gc.callbacks` and keeps the figures until someone takes them. The
callback runs inside the collector, on whichever thread triggered it, possibly while that thread holds a lock,
so it only appends to a deque (no lock of its own); the server's metrics take the figures from the engine
thread and the /metrics handler.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque

log = logging.getLogger(__name__)


def freeze_start_up_heap() -> int:
    """Collect, then freeze every object alive now (see the module's text); returns how many are frozen.

    Only for a process that keeps its engine to the end (the server): a frozen object is never collected,
    so an engine frozen and later replaced would stay in memory if it sits in a reference cycle."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d start-up objects frozen", frozen)
    return frozen


class GCPauses:
    """Records (generation, seconds) for every collection while installed."""

    def __init__(self) -> None:
        self._done: deque[tuple[int, float]] = deque()
        self._started: float | None = None
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def take(self) -> list[tuple[int, float]]:
        """The collections finished since the last call, oldest first."""
        out = []
        while True:
            try:
                out.append(self._done.popleft())
            except IndexError:
                return out

    def _callback(self, phase: str, info: dict) -> None:
        # one collection at a time (the collector holds the GIL and does not re-enter), so one start suffices
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._done.append((info["generation"], time.perf_counter() - self._started))
            self._started = None
