"""Load: 32 concurrent clients, 320 short requests (half streamed) against the live server.
Every request completes with exactly the tokens it asked for, and nothing is left running."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from live_server import MODEL_NAME

CLIENTS = 32
PER_CLIENT = 10
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "a", "mixture", "of", "experts",
         "routes", "every", "token"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_32_concurrent_clients(live_server):
    assert live_server.wait_idle()
    ok_before = sum(live_server.metric("moeflow:request_success_total", finished_reason=r) for r in ("stop", "length"))

    async def one(http: httpx.AsyncClient, rng: random.Random) -> tuple[int, int]:
        max_tokens = rng.randint(1, 6)
        body = {"model": MODEL_NAME, "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 24))),
                "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(1000),
                "ignore_eos": True}
        if rng.random() < 0.5:
            r = await http.post("/v1/completions", json=body)
            r.raise_for_status()
            return max_tokens, r.json()["usage"]["completion_tokens"]
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert len(chunks) == max_tokens + 1  # one per token, then usage
        return max_tokens, chunks[-1]["usage"]["completion_tokens"]

    async def client(worker: int) -> list[tuple[int, int]]:
        rng = random.Random(worker)
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as http:
            return [await one(http, rng) for _ in range(PER_CLIENT)]

    async def run():
        return await asyncio.gather(*(client(w) for w in range(CLIENTS)))

    start = time.monotonic()
    results = [pair for worker in asyncio.run(run()) for pair in worker]
    elapsed = time.monotonic() - start
    assert len(results) == CLIENTS * PER_CLIENT
    assert all(asked == got for asked, got in results)
    assert live_server.wait_idle(timeout=5)
    ok_after = sum(live_server.metric("moeflow:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert ok_after - ok_before == CLIENTS * PER_CLIENT
    assert live_server.client.queued == 0 and live_server.client._pending == 0
    print(f"{len(results)} requests from {CLIENTS} clients in {elapsed:.1f} s")
