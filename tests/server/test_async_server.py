"""`moeflow serve --async-scheduling`: a server whose steps are launched before the last one is settled answers
as an offline LLM that settles every step, for concurrent, streamed and stopped requests alike."""

from __future__ import annotations

import asyncio

import openai
import pytest
from live_server import MODEL_NAME, LiveServer

from moeflow.llm import LLM
from moeflow.sampling import SamplingParams

pytestmark = pytest.mark.timeout(120)

RESIDENT = {"expert_budget": "100%", "max_model_len": 256, "max_num_seqs": 4, "device": "cpu"}
PROMPTS = ["the quick brown fox", "hello world, bonjour", "a mixture of experts routes every token", "hola",
           "one two three", "le petit prince"]


@pytest.fixture(scope="module")
def server(model_dir):
    live = LiveServer(model_dir, **RESIDENT, async_scheduling=True)
    assert live.engine.async_scheduling and live.engine.async_blocker() is None
    live.rows_run = 0  # decode rows the engine ran, a void one (a sequence ended a step before) included

    def count(view, routes):
        live.rows_run += 0 if view.is_prefill else len(view.request_ids)

    live.engine.add_route_listener(count)
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def settled(model_dir):
    return LLM(str(model_dir), **RESIDENT)


def test_concurrent_requests_equal_settled_offline_ones(server, settled):
    """Six requests at once over four KV rows, sampled with seeds, some ending at a stop string or a stop token
    before their length: each answer is the settled engine's."""
    stop_ids = {1: settled.generate(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.9, seed=1,
                                                                ignore_eos=True))[0].outputs[0].token_ids[4]}
    requests = [dict(prompt=p, max_tokens=20, temperature=0.9, seed=i, stop=["e t"] if i == 2 else None,
                     extra_body={"ignore_eos": True, "stop_token_ids": [stop_ids[i]] if i in stop_ids else []})
                for i, p in enumerate(PROMPTS)]

    async def ask_all():
        # closed before the loop ends: a client left to the collector logs from its finalizer at a random later time
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(client.completions.create(model=MODEL_NAME, **r) for r in requests))

    got = asyncio.run(ask_all())
    for r, answer in zip(requests, got):
        want = settled.generate(r["prompt"], SamplingParams(
            max_tokens=20, temperature=0.9, seed=r["seed"], stop=r["stop"] or [],
            **r["extra_body"]))[0].outputs[0]
        assert (answer.choices[0].text, answer.choices[0].finish_reason) == (want.text, want.finish_reason)
        assert answer.usage.completion_tokens == len(want.token_ids)
    assert any(a.choices[0].finish_reason == "stop" for a in got)
    assert server.wait_idle() and server.engine.kv.num_free == 4
    # a request its stop token ended ran one void step: the steps were launched ahead of their settling
    assert server.rows_run > server.engine.counters["decode_tokens"]


def test_streamed_answer_is_one_chunk_per_token(server, settled):
    want = settled.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
        chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) == 10 and "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
