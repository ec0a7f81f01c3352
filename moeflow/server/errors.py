"""Every failure as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx whatever raised them (pydantic, moeflow's RequestError/ConfigError, or
this server's own checks); 5xx is kept for the server's own trouble: a full queue, a drain,
or an engine step that failed. A 500 says what failed and the request id, never the exception's
text (which can hold paths and internals): that goes to the log, once, under the same id.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeflow.errors import MoeflowError
from moeflow.server.engine_client import Draining, EngineStepError, QueueFull, RequestAborted
from moeflow.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("moeflow.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
_LEADING_NAME = re.compile(r"^([a-z_]+)\b")
_UNION_TAG = re.compile(r"[\[\]-]|^(str|int|bool|float|list|dict|none)$")  # pydantic's names for a union's forms
_MODEL_TAG = re.compile(r"^[A-Z]\w*$")  # a body that is one of several models: pydantic names the model first


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def from_moeflow_error(exc: MoeflowError, param: str | None = None) -> APIError:
    """A RequestError/ConfigError as a 400; their messages start with the field they are about."""
    if param is None and (m := _LEADING_NAME.match(str(exc))):
        param = m.group(1)
    return bad_request(str(exc), param)


def as_api_error(exc: BaseException, request_id: str | None = None) -> APIError:
    """Map whatever a request's engine work raised to what the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(503, str(exc), code="server_overloaded")
    if isinstance(exc, (Draining, RequestAborted)):
        return APIError(503, str(exc), code="server_shutting_down")
    ref = f" (request id {request_id})" if request_id else ""
    if isinstance(exc, EngineStepError):  # the engine thread has logged what failed, by engine request id
        return APIError(500, f"{exc}; the server log has the details{ref}", code="engine_error")
    if isinstance(exc, MoeflowError):
        return from_moeflow_error(exc)
    log.error("unexpected error while serving request %s", request_id, exc_info=exc)
    return APIError(500, f"internal server error; the server log has the details{ref}", code="internal_error")


def _shown(loc: list[str]) -> str:
    return ".".join(p for p in loc if not _UNION_TAG.search(p)) or "body"


def _one_model(errors: list[dict]) -> list[dict]:
    """For a body that may be one of several models, the errors of the model it most looks like (the one
    with the fewest missing fields), without the model's name in their locations."""
    def model(err: dict) -> str | None:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        return loc[0] if loc and _MODEL_TAG.match(loc[0]) else None

    names = list(dict.fromkeys(model(e) for e in errors))
    if None in names or not names:
        return errors
    best = min(names, key=lambda n: sum(e.get("type") == "missing" for e in errors if model(e) == n))
    return [{**e, "loc": tuple(p for p in e["loc"] if p != best)} for e in errors if model(e) == best]


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return bad_request("the request body is not valid JSON" + (f": {detail}" if detail else ""))
    errors = _one_model(errors)
    locs = [[str(p) for p in err.get("loc", ()) if p != "body"] for err in errors]
    param = locs[0][0] if locs and locs[0] else None
    if len(errors) > 1 and all(loc[:1] == [param] for loc in locs):
        # One field with several accepted forms (a union): pydantic lists each form's failure. Show the one
        # that got furthest: not "wrong type" if any form had the right type, else the deepest.
        i = max(range(len(errors)), key=lambda k: (not errors[k].get("type", "").endswith("_type"), len(locs[k]), k))
        return bad_request(f"{param}: the value matches none of the forms this field accepts "
                           f"({_shown(locs[i])}: {errors[i].get('msg')})", param)
    parts = [f"{_shown(loc)}: {err.get('msg', 'invalid')}" for loc, err in zip(locs[:3], errors)]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return bad_request("; ".join(parts) + more, param)


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for what FastAPI raises itself; routes (routes.py) turn their own exceptions into responses."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path[:200]}"
        return APIError(exc.status_code, message).response()

    async def on_other(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc, request_id(request)).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (APIError, MoeflowError, QueueFull, Draining, RequestAborted, EngineStepError):
        app.add_exception_handler(cls, on_other)
