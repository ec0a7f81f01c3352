"""How results travel back: Server-Sent Events, and waiting that notices a client hanging up.

A whole response is built and encoded to JSON bytes here, in the CPU pool when it is large (echo
and logprobs can make megabytes), and returned as a ready Response, so FastAPI does not validate
and encode it again on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, TypeAdapter

from moeflow.outputs import RequestOutput
from moeflow.server.engine_client import EngineClient, EngineRequest, Submission
from moeflow.server.errors import as_api_error, request_id
from moeflow.server.offload import CpuPool

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.2


def sse(event: BaseModel | dict) -> str:
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """Server-Sent Events that end with [DONE]; a failure mid-stream becomes an error event first.

    When the client hangs up, Starlette cancels the response, possibly before `events` has
    even started; closing the Submission here, whatever happened, frees the engine's rows.
    """

    def __init__(self, events: AsyncIterator[str], sub: Submission, request_id: str | None = None):
        super().__init__(self._body(events, request_id), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sub = sub

    @staticmethod
    async def _body(events: AsyncIterator[str], request_id: str | None) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - the headers are gone: the error can only travel as an event
            yield sse(as_api_error(exc, request_id).body())
        yield DONE

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.close()


async def unless_disconnected(work: Awaitable[T], request: Request) -> tuple[bool, T | None]:
    """(True, result) of `work`, or (False, None) once the client has gone (the work is cancelled)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return True, task.result()
            if await request.is_disconnected():
                return False, None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def final_outputs(sub: Submission) -> list[RequestOutput]:
    """Each engine request's last output, by index."""
    finals: list[RequestOutput | None] = [None] * len(sub.request_ids)
    async for index, out in sub:
        if out.finished:
            finals[index] = out
    return finals  # type: ignore[return-value]


class Call(Protocol):
    """One API call's view of its engine requests: an id, stream chunks, or one whole response."""

    id: str

    def stream(self, sub: Submission) -> AsyncIterator[str]: ...

    def response(self, finals: list[RequestOutput]) -> BaseModel: ...


async def answer(client: EngineClient, requests: list[EngineRequest], call: Call, stream: bool, request: Request,
                 arrival: float, cpu: CpuPool, weight: int = 0) -> Response:
    """Submit a call's requests, then stream its chunks, or wait for every final output and answer once
    (499 if the client hung up meanwhile: the Submission aborts what is still running). `weight`: about
    how many logprob entries and echoed tokens the whole response holds."""
    sub = client.submit(requests, call.id, arrival)
    if stream:
        return EventStream(call.stream(sub), sub, request_id(request))
    async with sub:
        connected, finals = await unless_disconnected(final_outputs(sub), request)
    if not connected:
        return Response(status_code=499)
    return await json_response(cpu, lambda: call.response(finals), weight)


async def json_response(cpu: CpuPool, build: Callable[[], BaseModel], weight: int) -> Response:
    """build() as a JSON response, built and encoded off the loop when `weight` says it is large."""
    body = await cpu.run(lambda: _json_bytes(build()), weight=weight, inline_below=2048)
    return Response(body, media_type="application/json")


def _json_bytes(model: BaseModel) -> bytes:
    return _adapter(type(model)).dump_json(model)  # bytes at once, not a str of megabytes to encode again


@functools.cache
def _adapter(cls: type[BaseModel]) -> TypeAdapter:
    return TypeAdapter(cls)
