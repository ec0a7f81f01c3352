"""A real uvicorn server on a free loopback port, in a background thread of the test process.

Being in-process, tests can look inside: the engine (is anything still running?), the
EngineClient, the metrics. Used by tests/server and tests/bench.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from moeflow.llm import LLM
from moeflow.server.app import create_app
from moeflow.server.engine_client import EngineClient
from moeflow.server.http import uvicorn_config
from moeflow.server.metrics import ServerMetrics
from moeflow.server.settings import ServerSettings

MODEL_NAME = "tiny-moe"


class AppServer:
    """uvicorn serving `app` on a free loopback port, in a background thread, configured as `moeflow serve`
    configures it."""

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0):
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


class LiveServer(AppServer):
    """The engine, its EngineClient and the app, served: tests can look inside all three."""

    def __init__(self, model_dir: Path, *, api_key: str | None = None, max_queue: int = 512,
                 server: dict | None = None, **engine_kwargs):
        settings = ServerSettings(served_model_name=MODEL_NAME, model_dir=str(model_dir), api_key=api_key,
                                  max_queue=max_queue, **(server or {}))
        self.engine = LLM(str(model_dir), **engine_kwargs).engine
        self.client = EngineClient(self.engine, max_queue=max_queue, metrics=ServerMetrics(MODEL_NAME))
        super().__init__(create_app(self.client, settings), settings)

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.client.start()
        return super().start(timeout)

    def stop(self) -> None:
        super().stop()
        self.client.stop()

    def idle(self) -> bool:
        return (self.client.num_live == 0 and self.engine.num_running == 0 and self.engine.num_waiting == 0
                and not self.engine.has_unfinished_requests())

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample in the server's registry (0 if absent)."""
        value = self.client.metrics.registry.get_sample_value(name, {"model_name": MODEL_NAME, **labels})
        return value or 0.0


def wait_until_healthy(proc, base_url: str, timeout: float = 60.0, why=lambda: "server did not come up") -> None:
    """Poll a `moeflow serve` subprocess's /health until it answers 200; fail with why() if the process dies or
    the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, why()
        time.sleep(0.2)
