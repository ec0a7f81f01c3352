"""The server under pressure and in trouble: a full queue, an engine step that fails, a drain,
and `moeflow serve` shutting down on SIGTERM. One small engine (one KV row) serves the
in-process tests; each builds its own EngineClient and app in front of it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from live_server import MODEL_NAME, wait_until_healthy

from moeflow.llm import LLM
from moeflow.server.app import create_app
from moeflow.server.engine_client import EngineClient
from moeflow.server.metrics import ServerMetrics
from moeflow.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)

LONG = {"prompt": "hola", "max_tokens": 30, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def one_row_engine(model_dir):
    return LLM(str(model_dir), expert_budget="25%", max_model_len=128, max_batch_size=1, device="cpu").engine


@pytest.fixture
def serve(one_row_engine, model_dir):
    """serve(max_queue) -> (EngineClient, app), torn down after the test."""
    made = []

    def make(max_queue: int = 8):
        client = EngineClient(one_row_engine, max_queue=max_queue, metrics=ServerMetrics(MODEL_NAME))
        client.start()
        made.append(client)
        settings = ServerSettings(served_model_name=MODEL_NAME, model_dir=str(model_dir), max_queue=max_queue)
        return client, create_app(client, settings)

    yield make
    for client in made:
        client.stop()
    assert not one_row_engine.has_unfinished_requests()


def asgi(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def test_requests_beyond_the_queue_get_503(serve):
    client, app = serve(max_queue=1)  # one running (one KV row) + one waiting at most

    async def run():
        async with asgi(app) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=LONG) for _ in range(4)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 2 and set(statuses) <= {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "server_overloaded" and r.headers["retry-after"]
    assert client.metrics.registry.get_sample_value(
        "moeflow:request_rejected_total", {"model_name": MODEL_NAME, "reason": "queue_full"}) >= 2


def test_engine_failure_fails_its_requests_with_500_and_the_server_lives_on(serve, one_row_engine, monkeypatch):
    _, app = serve()
    real_step = one_row_engine.step
    failures = iter([True, True])

    def flaky_step():
        outputs = real_step()
        if next(failures, False):
            raise RuntimeError("simulated device fault")
        return outputs

    monkeypatch.setattr(one_row_engine, "step", flaky_step)

    async def run():
        async with asgi(app) as http:
            broken = await http.post("/v1/completions", json=LONG)
            streamed = await http.post("/v1/completions", json={**LONG, "stream": True})
            healthy = await http.post("/v1/completions", json=LONG)
            health = await http.get("/health")
            return broken, streamed, healthy, health

    broken, streamed, healthy, health = asyncio.run(run())
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "engine_error"
    assert "simulated device fault" not in broken.json()["error"]["message"]  # it is in the log, by request id
    assert broken.headers["x-request-id"] in broken.json()["error"]["message"]
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
    assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 30
    assert health.status_code == 200
    assert not one_row_engine.has_unfinished_requests()


def test_drain_refuses_new_requests_and_lets_running_ones_finish(serve):
    client, app = serve()

    async def run():
        async with asgi(app) as http:
            running = asyncio.create_task(http.post("/v1/completions", json=LONG))
            while client.num_live == 0:
                await asyncio.sleep(0.01)
            drained = asyncio.create_task(client.drain(timeout=60))
            await asyncio.sleep(0.05)
            refused = await http.post("/v1/completions", json=LONG)
            health = await http.get("/health")
            return await running, refused, health, await drained

    finished, refused, health, drained = asyncio.run(run())
    assert drained is True
    assert finished.status_code == 200 and finished.json()["choices"][0]["finish_reason"] == "length"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert health.status_code == 503


def test_drain_timeout_stops_running_requests_with_503(serve):
    client, app = serve()

    async def run():
        async with asgi(app) as http:
            running = asyncio.create_task(http.post("/v1/completions", json={**LONG, "max_tokens": 120}))
            while client.num_live == 0:
                await asyncio.sleep(0.01)
            drained = await client.drain(timeout=0.05)
            return await running, drained

    stopped, drained = asyncio.run(run())
    assert drained is False
    assert stopped.status_code == 503 and stopped.json()["error"]["code"] == "server_shutting_down"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly(model_dir):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moeflow.cli", "serve", str(model_dir), "--port", str(port),
                             "--served-model-name", MODEL_NAME, "--expert-budget", "25%", "--device", "cpu",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(proc, base)
        events: list[str] = []
        first = threading.Event()

        def stream():
            body = {"prompt": "the", "max_tokens": 150, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, timeout=10)
        except httpx.TransportError as exc:  # the server stopped listening while it should be draining: say why
            proc.kill()
            pytest.fail(f"{exc!r} while draining; stream so far: {events[:3]}; server said: {proc.stdout.read()}")
        reader.join(60)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert events[-1] == "data: [DONE]" and len(events) == 151
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_a_second_sigterm_ends_every_request_with_an_error_and_exits_nonzero(model_dir):
    """The first signal drains; the second stops at once, but each request in flight still ends properly:
    a stream with an error event and [DONE], a plain request with a 503 JSON body; no traceback is logged."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moeflow.cli", "serve", str(model_dir), "--port", str(port),
                             "--served-model-name", MODEL_NAME, "--expert-budget", "25%", "--device", "cpu",
                             "--max-num-seqs", "4", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    body = {"prompt": "the", "max_tokens": 480, "ignore_eos": True}
    try:
        wait_until_healthy(proc, base)
        streams: list[list[str]] = [[], []]
        plain: list[httpx.Response] = []
        started = threading.Barrier(4)

        def stream(events):
            with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        if len(events) == 1:
                            started.wait()

        def post():
            started.wait()
            plain.append(httpx.post(f"{base}/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=stream, args=(events,)) for events in streams]
        threads.append(threading.Thread(target=post))
        for t in threads:
            t.start()
        started.wait(30)
        time.sleep(0.3)  # the plain request is running too
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = proc.wait(60)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert code != 0, log
    for events in streams:
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2][len("data: "):])["error"]
        assert error["code"] == "server_shutting_down" and len(events) < 480
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert "start-up objects frozen" in log, log  # the server froze its start-up heap before serving
