"""GuardedRoute: every route of the app, with JSON parsed off the event loop and exceptions answered once.

FastAPI parses a request body with `await request.json()` on the event loop; a body of a few MB
of token ids takes tens of milliseconds there, during which no other stream moves. Here a body
past a small size is parsed in the CPU pool instead.

An exception a handler did not turn into a response becomes one here, inside Starlette's
outermost middleware: left to that middleware, it would be logged twice (by Starlette and by
uvicorn, with two tracebacks) and answered as text/plain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from moeflow.server.errors import as_api_error, request_id
from moeflow.server.offload import CpuPool

INLINE_JSON_BYTES = 64 * 1024  # smaller bodies parse in well under a millisecond: not worth a thread hop


class _OffloadedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            pool: CpuPool = self.app.state.cpu
            self._json = await pool.run(json.loads, body, weight=len(body), inline_below=INLINE_JSON_BYTES)
        return self._json


class GuardedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(_OffloadedJSONRequest(request.scope, request.receive))
            except (HTTPException, RequestValidationError):
                raise  # FastAPI's own, with handlers of their own (errors.py)
            except Exception as exc:  # noqa: BLE001 - the one place a request's unexpected error is answered
                return as_api_error(exc, request_id(request)).response()

        return guarded
