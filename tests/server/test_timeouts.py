"""Half-sent requests time out (issue 15, finding 7): a connection that never finishes its headers, or its
body, is answered 408 and closed after --header-timeout / --body-timeout, instead of staying open."""

from __future__ import annotations

import socket
import time

import pytest
from live_server import AppServer, MODEL_NAME

from moeflow.server.app import create_app
from moeflow.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(60)

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5


@pytest.fixture(scope="module")
def strict_server(live_server, model_dir):
    settings = ServerSettings(served_model_name=MODEL_NAME, model_dir=str(model_dir), header_timeout_s=HEADER_TIMEOUT,
                              body_timeout_s=BODY_TIMEOUT)
    server = AppServer(create_app(live_server.client, settings), settings).start()
    yield server
    server.stop()


def _connect(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def _closed_within(sockets: list[socket.socket], deadline: float) -> list[bytes]:
    """What each socket received before the server closed it; fails if one is still open at the deadline."""
    got = []
    for s in sockets:
        data = b""
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                pytest.fail(f"a connection was still open after the timeout; it had received {data[:80]!r}")
            if not chunk:
                break
            data += chunk
        got.append(data)
        s.close()
    return got


def test_half_sent_headers_and_bodies_are_closed(strict_server):
    port = strict_server.port
    body_head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"prompt\": ")
    started = time.monotonic()
    idle = [_connect(port, b"") for _ in range(10)]  # connected, sent nothing
    headers = [_connect(port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-le") for _ in range(20)]
    bodies = [_connect(port, body_head) for _ in range(20)]
    got = _closed_within(idle + headers + bodies, started + max(HEADER_TIMEOUT, BODY_TIMEOUT) + 3)
    elapsed = time.monotonic() - started
    assert elapsed < max(HEADER_TIMEOUT, BODY_TIMEOUT) + 3
    for data in got[: len(idle) + len(headers)]:
        assert data == b"" or data.startswith(b"HTTP/1.1 408")
    for data in got[len(idle) + len(headers) :]:
        assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data


def test_a_slow_but_steady_body_still_times_out(strict_server):
    """One byte every 0.2 s never lets a read time out, but the body as a whole has a deadline."""
    s = _connect(strict_server.port, b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n")
    started = time.monotonic()
    s.settimeout(0.2)
    data, closed = b"", False
    while not closed and time.monotonic() - started < BODY_TIMEOUT + 3:
        if not data:  # once the answer has begun, only read: a byte sent to a closed socket is answered by a reset
            try:
                s.sendall(b" ")
            except OSError:  # the server has closed: what it sent before may still be unread
                s.settimeout(1.0)
        try:
            chunk = s.recv(65536)
            closed = not chunk
            data += chunk
        except TimeoutError:
            pass
        except OSError:  # reset after the server closed
            closed = True
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data
    assert time.monotonic() - started < BODY_TIMEOUT + 2


def test_requests_that_arrive_in_time_are_served(strict_server):
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=10) as s:
        for _ in range(2):  # keep-alive: the second request's headers get their own deadline
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            data = b""
            while b'{"status":"ok"}' not in data:
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT / 2)
