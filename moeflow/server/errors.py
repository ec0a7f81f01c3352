"""Every failure as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx whatever raised them (pydantic, moeflow's RequestError/ConfigError, or
this server's own checks); 5xx is kept for the server's own trouble: a full queue, a drain,
or an engine step that failed.
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
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
_LEADING_NAME = re.compile(r"^([a-z_]+)\b")


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


def as_api_error(exc: BaseException) -> APIError:
    """Map whatever a request's engine work raised to what the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(503, str(exc), code="server_overloaded")
    if isinstance(exc, (Draining, RequestAborted)):
        return APIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), code="engine_error")
    if isinstance(exc, MoeflowError):
        return from_moeflow_error(exc)
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return bad_request("the request body is not valid JSON" + (f": {detail}" if detail else ""))
    locs = [[str(p) for p in err.get("loc", ()) if p != "body"] for err in errors]
    param = locs[0][0] if locs and locs[0] else None
    if len(errors) > 1 and all(loc[:1] == [param] for loc in locs):
        # one field with several accepted forms (a union): pydantic lists each form's failure
        return bad_request(f"{param}: the value matches none of the forms this field accepts "
                           f"(first: {'.'.join(locs[0])}: {errors[0].get('msg')})", param)
    parts = [f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}" for loc, err in zip(locs[:3], errors)]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return bad_request("; ".join(parts) + more, param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (APIError, MoeflowError, QueueFull, Draining, RequestAborted, EngineStepError, Exception):
        app.add_exception_handler(cls, on_api_error)
