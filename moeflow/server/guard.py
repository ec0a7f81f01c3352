"""RequestGuard: the ASGI middleware every request passes first.

It gives the request an id (`X-Request-Id` on the response, and in logs and 500 bodies), and reads
the body before the app sees it, with two bounds:

  size  a body past --max-request-bytes is answered 413 as soon as its Content-Length (or the
        bytes so far) says so, without reading or parsing the rest
  time  a body not complete --body-timeout seconds after its headers is answered 408 and the
        connection closed: a client sending one byte a second cannot hold a connection open

Headers that never finish are the HTTP protocol's to time out (http.py). The body is then handed
to the app whole; later `receive` calls go to the server, so the app still notices a disconnect.
Once the app is done with a request (its response sent), `request_done(body size)` is called:
the CPU pool trims the heap after large ones.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

from moeflow.server.errors import APIError

Scope = dict
Message = dict


class RequestGuard:
    def __init__(self, app, *, max_body_bytes: int, body_timeout_s: float,
                 request_done: Callable[[int], None] | None = None):
        self.app = app
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.request_done = request_done

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _answer(send_with_id, self._too_large(declared))
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read_body(receive)
        except TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                  f"(--body-timeout)", code="request_timeout")
            await _answer(send_with_id, error, close=True)
            return
        except _TooLarge as exc:
            await _answer(send_with_id, self._too_large(exc.size))
            return
        if body is None:  # the client left while sending
            return
        size = len(body)
        try:
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            del body
            if self.request_done is not None:
                self.request_done(size)

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body has {size} bytes or more, beyond this server's limit of "
                             f"{self.max_body_bytes} (--max-request-bytes)", code="request_too_large")


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses these before the app runs
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send, error: APIError, *, close: bool = False) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
