"""Schemathesis against the app's own OpenAPI schema, in-process over ASGI: whatever the body,
the server answers without a 5xx. A small context and queue keep each generated call cheap."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import MODEL_NAME
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from moeflow.llm import LLM
from moeflow.server.app import create_app
from moeflow.server.engine_client import EngineClient
from moeflow.server.metrics import ServerMetrics
from moeflow.server.settings import ServerSettings


@pytest.fixture(scope="module")
def fuzz_app(model_dir):
    engine = LLM(str(model_dir), expert_budget="25%", max_model_len=40, max_batch_size=4, device="cpu").engine
    client = EngineClient(engine, max_queue=8, metrics=ServerMetrics(MODEL_NAME))
    client.start()
    yield create_app(client, ServerSettings(served_model_name=MODEL_NAME, model_dir=str(model_dir), max_queue=8))
    client.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


POSTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
GETS = ["/v1/models", "/health", "/metrics", "/tokenizer_info"]
CASES = ([("POST", path, mode) for path in POSTS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
         + [("GET", path, GenerationMode.POSITIVE) for path in GETS])  # a GET without parameters has no wrong form


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method, path, mode", CASES, ids=str)
def test_no_server_errors(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL_NAME  # a random name is a 404 before anything interesting runs
        response = case.call()
        case.validate_response(response, checks=[not_a_server_error])

    check()
