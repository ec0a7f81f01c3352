"""The server tests' fixtures: one live server on a tiny random checkpoint, and the offline LLM
on the same checkpoint to compare against. Both use a 25% expert budget, so the cache misses."""

from __future__ import annotations

import pytest
from live_server import LiveServer

from moeflow.llm import LLM

ENGINE = {"expert_budget": "25%", "max_model_len": 512, "max_batch_size": 16, "device": "cpu"}


@pytest.fixture(scope="session")
def model_dir(checkpoint):
    return checkpoint("qwen3_moe", "per_expert")


@pytest.fixture(scope="session")
def live_server(model_dir):
    # outputs built while the next step runs, as a server on CUDA builds them; offline_llm builds them at once
    server = LiveServer(model_dir, **ENGINE, overlap_output=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def offline_llm(model_dir):
    return LLM(str(model_dir), **ENGINE)
