"""Requests a probe from outside sent to break the server: bad text, wrong types, amplification, exposure.
Each is refused with a 4xx that names the field (or answered without internals), and none logs a
traceback. The cases follow issue 15's findings 1, 3 and 8."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time

import httpx
import pytest
from live_server import MODEL_NAME

from moeflow.errors import ConfigError
from moeflow.llm import LLM
from moeflow.server.app import create_app
from moeflow.server.engine_client import EngineClient
from moeflow.server.metrics import ServerMetrics
from moeflow.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        yield client


@pytest.fixture
def server_log():
    """Records of warning level and above from moeflow's and uvicorn's loggers while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("moeflow", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def post_json(http, path, body, **kw):
    """`body` as the JSON text json.dumps writes: a lone surrogate becomes the escape \\ud800, as a client sends it."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}, **kw)


def asgi(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test", timeout=60)


# -- finding 1: text that is not valid Unicode --------------------------------------------------------

CHAT = "/v1/chat/completions"
SURROGATES = [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "a\udfffb"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2, "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud83d"], "max_tokens": 2}, "stop"),
    ("/v1/completions", {"prompt": "hi", "model": "x\ud800", "max_tokens": 2}, "model"),
    ("/v1/completions", {"prompt": "hi", "user": "\ud800", "max_tokens": 2}, "user"),
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800"}], "max_tokens": 2}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800"}], "max_tokens": 2, "stream": True}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages"),
    (CHAT, {"messages": [{"role": "u\ud800", "content": "hi"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "model": "\ud800"}, "model"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
]


@pytest.mark.parametrize("path, body, param", SURROGATES, ids=lambda v: v if isinstance(v, str) else None)
def test_a_lone_surrogate_is_400_naming_the_field(http, server_log, path, body, param):
    r = post_json(http, path, body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]
    assert not server_log, [rec.getMessage() for rec in server_log]


# -- finding 3: an API key that is empty or blank -----------------------------------------------------

@pytest.mark.parametrize("key", ["", " ", "\t", " sesame", "sesame\n"])
def test_an_empty_blank_or_padded_api_key_is_refused(key):
    with pytest.raises(ConfigError, match="api_key"):
        ServerSettings(served_model_name=MODEL_NAME, model_dir="x", api_key=key)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_with_an_empty_api_key_refuses_to_start(model_dir, how):
    args = ["--api-key", ""] if how == "flag" else []
    env = {"MOEFLOW_API_KEY": ""} if how == "env" else {}
    proc = subprocess.run([sys.executable, "-m", "moeflow.cli", "serve", str(model_dir), "--device", "cpu",
                           "--port", "0", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr
    assert "api" in proc.stderr.lower() and "key" in proc.stderr and "Traceback" not in proc.stderr


def test_tokenizer_routes_need_the_key_when_one_is_set(live_server):
    app = create_app(live_server.client, ServerSettings(served_model_name=MODEL_NAME, model_dir="x", api_key="k"))

    async def run():
        async with asgi(app) as http:
            key = {"Authorization": "Bearer k"}
            return ([(await http.post("/tokenize", json={"prompt": "hi"})).status_code,
                     (await http.post("/detokenize", json={"tokens": [5]})).status_code,
                     (await http.get("/tokenizer_info")).status_code],
                    [(await http.post("/tokenize", json={"prompt": "hi"}, headers=key)).status_code,
                     (await http.get("/health")).status_code, (await http.get("/metrics")).status_code])

    without_key, with_key_or_open = asyncio.run(run())
    assert without_key == [401, 401, 401]
    assert with_key_or_open == [200, 200, 200]


# -- finding 8: strict types ------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"max_tokens": False}, "max_tokens"),  # was score-only mode
    ("/v1/completions", {"max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 5.0}, "max_tokens"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),  # was token ids 1 and 0
    ("/v1/completions", {"prompt": [[1, True]]}, "prompt"),
    ("/v1/completions", {"temperature": True}, "temperature"),
    ("/v1/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"n": True}, "n"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": 1}, "echo"),
    ("/v1/completions", {"stream": "false"}, "stream"),
    ("/v1/completions", {"seed": "7"}, "seed"),
    ("/v1/completions", {"stop_token_ids": [False]}, "stop_token_ids"),
    (CHAT, {"max_completion_tokens": True}, "max_completion_tokens"),
    (CHAT, {"logprobs": 1}, "logprobs"),
    (CHAT, {"top_logprobs": False, "logprobs": True}, "top_logprobs"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": 0}, "add_special_tokens"),
])
def test_a_boolean_or_a_numeric_string_is_not_a_number(http, path, body, param):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else
            {"prompt": "hi"} if path.startswith("/v1") or path == "/tokenize" else {})
    r = post_json(http, path, {**base, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- finding 8: amplification -------------------------------------------------------------------------

def test_a_huge_model_name_is_not_echoed(http):
    r = post_json(http, "/v1/completions", {"prompt": "hi", "model": "m" * 2**20})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.content) < 2048


@pytest.mark.parametrize("body, param", [
    ({"stop": [f"s{i}" for i in range(50_000)]}, "stop"),
    ({"stop": ["x" * 5000]}, "stop"),
    ({"stop_token_ids": list(range(300)) * 20}, "stop_token_ids"),
])
def test_stop_lists_are_bounded(http, body, param):
    started = time.monotonic()
    r = post_json(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert time.monotonic() - started < 5


def test_a_few_stop_strings_still_work(http):
    r = post_json(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(16)]})
    assert r.status_code == 200


def test_echo_and_logprobs_volume_is_bounded(http, offline_llm):
    """64 prompts of 500 ids, echoed with 20 logprobs each: 672,000 entries, a response of ~40 MB."""
    ids = offline_llm.tokenizer.encode("the quick brown fox " * 200)[:500]
    body = {"prompt": [ids] * 64, "max_tokens": 0, "echo": True, "logprobs": 20}
    started = time.monotonic()
    r = post_json(http, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text[:300]
    assert time.monotonic() - started < 5
    # what lm-evaluation-harness sends is well inside the bound
    r = post_json(http, "/v1/completions", {**body, "prompt": [ids] * 4, "logprobs": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_chat_logprobs_volume_is_bounded(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 20, "n": 128,
            "max_completion_tokens": 250}
    r = post_json(http, CHAT, body)  # 128 choices x 250 tokens x 21 entries
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text[:300]


# -- finding 8: exposure ------------------------------------------------------------------------------

def test_models_do_not_show_the_model_path(http, model_dir):
    r = http.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["root"] == MODEL_NAME
    assert str(model_dir) not in r.text and model_dir.name not in r.text


def test_an_engine_failure_answers_without_internals(http, live_server, monkeypatch, server_log):
    real_step = live_server.engine.step
    failures = iter([True])

    def failing_step():
        outputs = real_step()
        if next(failures, False):
            raise RuntimeError("simulated fault in /very/secret/path")
        return outputs

    monkeypatch.setattr(live_server.engine, "step", failing_step)
    r = post_json(http, "/v1/completions", {"prompt": "hi", "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    message = r.json()["error"]["message"]
    assert "secret" not in message and "RuntimeError" not in message
    request_id = r.headers["x-request-id"]
    assert request_id in message
    logged = "\n".join(rec.getMessage() + str(rec.exc_info) for rec in server_log)
    assert request_id in logged and "/very/secret/path" in logged  # the details are in the log, by request id


def test_an_unexpected_error_answers_without_internals(http, live_server, monkeypatch, server_log):
    def broken(*args, **kwargs):
        raise RuntimeError("boom in /very/secret/path")

    monkeypatch.setattr(live_server.client.tokenizer, "decode", broken)
    r = post_json(http, "/detokenize", {"tokens": [5, 6]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    message = r.json()["error"]["message"]
    assert "secret" not in message and "boom" not in message and r.headers["x-request-id"] in message
    tracebacks = [rec for rec in server_log if rec.exc_info]
    assert len(tracebacks) == 1 and r.headers["x-request-id"] in tracebacks[0].getMessage()


# -- finding 8: --max-queue counts requests that wait for a KV row, nothing else ------------------------

@pytest.fixture(scope="module")
def four_row_engine(model_dir):
    return LLM(str(model_dir), expert_budget="25%", max_model_len=128, max_batch_size=4, device="cpu").engine


def test_max_queue_counts_only_requests_waiting_for_a_row(four_row_engine, model_dir):
    client = EngineClient(four_row_engine, max_queue=1, metrics=ServerMetrics(MODEL_NAME))
    client.start()
    app = create_app(client, ServerSettings(served_model_name=MODEL_NAME, model_dir=str(model_dir), max_queue=1))
    long = {"prompt": "hola", "max_tokens": 20, "ignore_eos": True}

    async def run():
        async with asgi(app) as http:
            # four rows are free: two calls at once, and a call of n=3, all start at once and none waits
            pair = await asyncio.gather(http.post("/v1/completions", json=long),
                                        http.post("/v1/completions", json=long))
            fan = await http.post("/v1/completions", json={**long, "n": 3})
            # 4 running + 1 waiting is the bound: of six more at once, one waits and the rest get 503
            longer = {**long, "max_tokens": 100}  # long enough that none ends before the last is submitted
            burst = await asyncio.gather(*(http.post("/v1/completions", json=longer) for _ in range(6)))
            return pair, fan, burst

    try:
        pair, fan, burst = asyncio.run(run())
    finally:
        client.stop()
    assert [r.status_code for r in pair] == [200, 200]
    assert fan.status_code == 200 and len(fan.json()["choices"]) == 3
    assert sorted(r.status_code for r in burst) == [200] * 5 + [503]
