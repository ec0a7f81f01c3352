"""uvicorn, configured as `moeflow serve` runs it: its HTTP protocol with a deadline for request headers.

uvicorn times out a connection idle between requests (keep-alive), but not one that is slow to
send a request: a client that connects and sends nothing, or half a header line, holds the
connection (and its file descriptor) for as long as it likes. Here each request's headers must
be complete within --header-timeout seconds of its first byte (or of the connection opening);
otherwise the server answers 408 and closes. The body has its own deadline (guard.py).
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from moeflow.server.settings import ServerSettings

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: 48\r\n\r\n"
                     b"the request headers did not arrive in time (408)")


def header_timeout_protocol(base: type[asyncio.Protocol], timeout_s: float) -> type[asyncio.Protocol]:
    """`base` (uvicorn's h11 or httptools protocol), closing connections whose request headers are late.

    Both protocols start a request-response `cycle` when a request's headers are complete; so between
    the end of one response (or the connection's start) and a new cycle, headers are still to come.
    """

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:
                self._disarm()  # a request's headers are complete
            elif self.cycle is None or self.cycle.response_complete:
                self._arm()  # bytes of the next request, or of a body the app did not read

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._expire, self.cycle)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self, cycle) -> None:
            self._header_timer = None
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info", http: str = "auto") -> uvicorn.Config:
    base = import_from_string(HTTP_PROTOCOLS[http])
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                          http=header_timeout_protocol(base, settings.header_timeout_s))
