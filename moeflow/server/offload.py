"""CpuPool: CPU-heavy request work (JSON, tokenization, logprobs, response bodies) off the event loop.

Everything on the event loop delays every stream: a 10 MiB prompt tokenized there stopped all
other clients for seconds. Work past a small size runs here instead, on a few worker threads,
so the loop only waits for it; the tokenizer lets go of the GIL while it encodes, and pure-Python
work gives it back every few milliseconds, so the loop (and the engine thread) keep running.
Fewer workers than cores, and a bounded number at a time: large requests wait for each other,
not for the streams. Small work runs inline, where a thread hop would cost more than the work.

After a large request the C heap is trimmed (glibc only): the tokenizer's and JSON's many small
allocations, and the large buffers glibc keeps on its heap once it has raised its mmap threshold,
otherwise stay in the process after the request that needed them is gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

INLINE_BELOW = 16 * 1024  # weight (about bytes of text, or items) below which work runs on the loop
TRIM_ABOVE = 8 * 2**20  # work (or a request body, in bytes) past which the heap is trimmed after the request


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class CpuPool:
    """A few worker threads, shared by every event loop the app runs on; work beyond them queues (a queued
    job whose request is cancelled never starts)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or default_workers()
        self._executor: ThreadPoolExecutor | None = None  # threads start with the first large job
        self._lock = threading.Lock()
        self._trim = _malloc_trim()
        self._large_work = False  # a large job ran since the heap was last trimmed

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="moeflow-cpu")
            return self._executor

    async def run(self, fn: Callable[..., T], *args, weight: int, inline_below: int = INLINE_BELOW) -> T:
        """fn(*args): on the loop if `weight` is small, else on a worker once one is free."""
        if weight < inline_below:
            return fn(*args)
        if weight >= TRIM_ABOVE:
            self._large_work = True
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    def request_done(self, body_bytes: int) -> None:
        """After each request, once its objects are freed: trim the heap (on a worker) if it was a large one."""
        if self._trim is not None and (self._large_work or body_bytes >= TRIM_ABOVE):
            self._large_work = False
            self._pool().submit(self._trim, 0)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
