"""EngineClient: one thread owns and steps the engine; coroutines submit, abort and read outputs.

The engine is not thread-safe and `step()` blocks, so every call into it happens on the engine
thread. Coroutines talk to that thread through a command queue that it drains between steps (so
a new request joins the running batch at the next step); it sleeps on an event while it has no
work. Each step's outputs go back to the event loop of the coroutine that submitted them, with
one `call_soon_threadsafe` per loop per step.

A Submission is the engine requests of one API call (prompts x n), read together as
(index, RequestOutput) pairs. Leaving it (`async with`) aborts whatever has not finished: a
client that hangs up frees its KV rows at the next step.

The queue bound (--max-queue) is on requests that would wait for a KV row: those submitted but
not yet handed to the engine, plus those the engine holds waiting, less the rows free at the
last step. A request in the running batch never counts, whether or not it has a token yet.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Self

from moeflow.engine.engine import LLMEngine
from moeflow.errors import MoeflowError
from moeflow.outputs import RequestOutput
from moeflow.sampling import SamplingParams
from moeflow.server.metrics import ServerMetrics

log = logging.getLogger("moeflow.server")


class QueueFull(Exception):
    """More requests are waiting than the server was told to queue."""


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


class RequestAborted(Exception):
    """The server ended a running request (a drain that ran out of time)."""


class EngineStepError(Exception):
    """An engine step failed while this request was in its batch."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams


class Submission:
    """The engine requests of one API call. Iterate for (index, output); leave to abort the rest."""

    def __init__(self, client: EngineClient, request_ids: list[str]):
        self._client = client
        self.request_ids = request_ids
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._open = set(range(len(request_ids)))

    def __aiter__(self) -> Submission:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._open:
            raise StopAsyncIteration
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            self._open.discard(index)
            raise item
        if item.finished:
            self._open.discard(index)
        return index, item

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for index in self._open:
            self._client.abort(self.request_ids[index])
        self._open.clear()

    def _put(self, index: int, item: RequestOutput | BaseException) -> None:  # on self.loop
        self._queue.put_nowait((index, item))


class EngineClient:
    def __init__(self, engine: LLMEngine, *, max_queue: int, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.spec.vocab_size
        self.rows = engine.kv.rows  # sequences that can run at once
        self.max_queue = max_queue
        self.metrics = metrics
        self.draining = False
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        # The queue bound's figures, guarded by _lock: submissions of several event loops and the engine
        # thread touch them. Rows and waiting are as the engine left them after its latest step.
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet handed to the engine
        self._waiting = 0  # handed to the engine, waiting for a KV row
        self._free_rows = engine.kv.num_free
        self._live: dict[str, tuple[Submission, int]] = {}  # engine thread only
        self.num_live = 0  # len(_live), published by the engine thread for the drain to poll
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.bind(engine)

    # -- lifecycle (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        if self.metrics:
            self.metrics.gc.install()  # collections pause the engine thread too: time them while it runs
        self._thread = threading.Thread(target=self._run, name="moeflow-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine thread; requests still running get RequestAborted."""
        if self._thread is None:
            return
        self._command("stop")
        self._thread.join(timeout)
        self._thread = None
        if self.metrics:
            self.metrics.gc.remove()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Engine requests that would wait for a KV row if the engine stepped now."""
        with self._lock:
            return max(0, self._pending + self._waiting - self._free_rows)

    async def drain(self, timeout: float) -> bool:
        """Admit nothing new and wait for the running requests; True if all finished in time (else they are
        stopped with RequestAborted)."""
        self.draining = True
        if await self.wait_idle(timeout):
            return True
        self.abort_all("the server is shutting down: this request ran past the drain timeout and was stopped")
        return False

    def abort_all(self, reason: str) -> None:
        """End every request now, each with RequestAborted(reason); admit nothing new."""
        self.draining = True
        self._command("abort_all", reason)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is queued or running; True if that happened within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.num_live or self._pending or not self._commands.empty():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- requests (on an event loop) -------------------------------------------------------------

    def submit(self, requests: list[EngineRequest], request_id: str, arrival_time: float | None = None) -> Submission:
        """Queue the requests of one API call; raise Draining or QueueFull instead of queueing past the bound."""
        if self.draining or not self.alive:
            if self.metrics:
                self.metrics.rejected("draining")
            raise Draining("the server is shutting down and admits no new requests")
        with self._lock:
            waiting = max(0, self._pending + self._waiting - self._free_rows)
            if max(0, self._pending + self._waiting + len(requests) - self._free_rows) > self.max_queue:
                if self.metrics:
                    self.metrics.rejected("queue_full")
                raise QueueFull(f"the server is busy: {waiting} requests are already waiting for a slot "
                                f"(--max-queue {self.max_queue}); retry later")
            self._pending += len(requests)
        ids = [request_id] if len(requests) == 1 else [f"{request_id}-{i}" for i in range(len(requests))]
        sub = Submission(self, ids)
        arrival_time = arrival_time or time.time()
        for index, (rid, req) in enumerate(zip(ids, requests)):
            self._commands.put(("add", rid, req, sub, index, arrival_time))
        self._wake.set()
        return sub

    def abort(self, request_id: str) -> None:
        self._command("abort", request_id)

    def _command(self, *cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_unfinished_requests() and self._commands.empty():
                self._publish()
                self._wake.wait()
                self._wake.clear()
            try:
                if self._apply_commands():
                    break
                if engine.has_unfinished_requests():
                    self._step()
            except Exception:  # a bug in this loop must not end the server
                log.exception("engine loop error")
        self._fail(list(self._live), RequestAborted("the server shut down before this request finished"))

    def _apply_commands(self) -> bool:
        """Run the queued commands; True when told to stop."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return False
            kind = cmd[0]
            if kind == "add":
                self._add(*cmd[1:])
            elif kind == "abort":
                self._abort(cmd[1], None)
            elif kind == "abort_all":
                self._fail(list(self._live), RequestAborted(cmd[1]))
                self._publish()
            elif kind == "stop":
                return True

    def _add(self, rid: str, req: EngineRequest, sub: Submission, index: int, arrival_time: float) -> None:
        try:
            self.engine.add_request(rid, req.prompt_ids, req.params, arrival_time=arrival_time)
        except MoeflowError as exc:  # the handler checks first, so this is a late safety net
            with self._lock:
                self._pending -= 1
            self._deliver([(sub, index, exc)])
            return
        with self._lock:
            self._pending -= 1
            self._waiting += 1  # until the next step says whether it found a row
        self._live[rid] = (sub, index)

    def _abort(self, rid: str, error: BaseException | None) -> None:
        owner = self._live.pop(rid, None)
        if owner is None:
            return  # finished (or failed) before the abort arrived
        self.engine.abort_request(rid)
        if self.metrics:
            self.metrics.request_ended(rid, "abort" if error is None else "error")
        if error is not None:
            self._deliver([(*owner, error)])

    def _fail(self, rids: list[str], error: BaseException) -> None:
        for rid in rids:
            self._abort(rid, error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # The batch is every running sequence (a prefill has admitted its new ones by now).
            running = [s.request_id for s in self.engine.scheduler.running] or list(self._live)
            log.exception("engine step failed; failing the requests in its batch: %s", ", ".join(running))
            self._fail(running, EngineStepError("the engine failed while running this request"))
            self._publish()
            return
        deliveries = []
        for out in outputs:
            owner = self._live.get(out.request_id)
            if owner is None:
                continue
            if out.finished:
                del self._live[out.request_id]
            deliveries.append((*owner, out))
        # publish the rows finished requests freed before telling their clients: a client that hears its
        # request is done and sends the next must find the row free
        self._publish()
        self._deliver(deliveries)
        if self.metrics:
            self.metrics.step_done(self.engine, outputs)

    def _publish(self) -> None:
        self.num_live = len(self._live)
        with self._lock:
            self._waiting = self.engine.num_waiting
            self._free_rows = self.engine.kv.num_free
        if self.metrics:
            self.metrics.set_queue(self.engine.num_running, self.engine.num_waiting)

    def _deliver(self, items: list[tuple[Submission, int, RequestOutput | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for item in items:
            by_loop[item[0].loop].append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:  # that loop has closed: nobody is reading these requests any more
                for sub, index, _ in batch:
                    self._abort(sub.request_ids[index], None)


def _dispatch(batch: list[tuple[Submission, int, RequestOutput | BaseException]]) -> None:
    for sub, index, item in batch:
        sub._put(index, item)
