"""Serving's closed loop on one engine, without a server: `moeflow bench serve --max-concurrency C` keeps C requests
in flight and sends the next as one finishes; `closed_loop` drives an engine the same way, so that what a
scheduling policy does to the steps and the expert bytes of serving can be seen on any device
(tools/closed_loop.py, tests/engine/test_route_aware.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeflow.bench.workload import Request
from moeflow.engine.engine import LLMEngine
from moeflow.outputs import RequestOutput


@dataclass
class ClosedLoop:
    outputs: dict[str, RequestOutput] = field(default_factory=dict)  # by request id ("0", "1", ...), finished
    sent: dict[str, int] = field(default_factory=dict)  # the engine step index when each request was added
    prefilled: dict[str, int] = field(default_factory=dict)  # the index of the step that prefilled it
    bytes_moved: int = 0  # expert bytes host->device over the loop: demand loads and prefetches

    @property
    def prefill_steps(self) -> int:
        return len(set(self.prefilled.values()))

    @property
    def admission_waits(self) -> list[int]:
        """Per request, in request order: the steps between its sending and its prefill."""
        return [self.prefilled[r] - self.sent[r] for r in self.sent]


def closed_loop(engine: LLMEngine, requests: list[Request], in_flight: int) -> ClosedLoop:
    """Send requests[0..in_flight) (request i with id str(i)), then the next each time one finishes, until all
    have finished."""
    run = ClosedLoop()

    def prefilled(view, routes) -> None:
        if view.is_prefill:
            run.prefilled.update(dict.fromkeys(view.request_ids, view.index))

    remove = engine.add_route_listener(prefilled)
    before = engine.cache.stats.total().total_bytes

    def send(i: int) -> None:
        run.sent[str(i)] = engine.next_step_index
        engine.add_request(str(i), requests[i].prompt, requests[i].params)

    try:
        for i in range(min(in_flight, len(requests))):
            send(i)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    run.outputs[out.request_id] = out
                    if len(run.sent) < len(requests):
                        send(len(run.sent))
    finally:
        remove()
    run.bytes_moved = engine.cache.stats.total().total_bytes - before
    return run
