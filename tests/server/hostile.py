"""The soak's hostile client (test_soak.py runs it as a process of its own, so that its work never delays the
reading of the normal streams it is measured against): every hostile request of issue 15, in rounds.

    python hostile.py BASE_URL PORT ROUNDS OUT.json

Every round sends each request once (the 10 MiB ones in the first round only), opens 60 half-sent
connections and hangs up 8 streams after their first token.

Prints "ready" once its payloads are built, waits for a line on stdin, runs, and writes to OUT.json the
status counts by category, each request's (category, start, end) on the system-wide monotonic clock,
and the half-sent connections still open after the server's timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import sys
import time

import httpx

MiB = 2**20
TEXT = "the quick brown fox jumps over the lazy dog. "
IDS = [5 + i % 250 for i in range(500)]  # token ids inside any test model's vocabulary


def bodies() -> list[tuple[str, str, bytes, int]]:
    """(category, path, body, expected status)."""
    cases = [
        ("surrogate", "/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, 400),
        ("surrogate", "/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2, "stream": True}, 400),
        ("surrogate", "/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, 400),
        ("surrogate", "/tokenize", {"prompt": "x\ud800"}, 400),
        ("surrogate", "/v1/completions", {"prompt": "hi", "model": "\ud800"}, 400),
        ("types", "/v1/completions", {"prompt": "hi", "max_tokens": False}, 400),
        ("types", "/v1/completions", {"prompt": [True, False]}, 400),
        ("types", "/v1/completions", {"prompt": "hi", "temperature": "0.5"}, 400),
        ("stop-list", "/v1/completions", {"prompt": "hi", "stop": [f"s{i}" for i in range(50_000)]}, 400),
        ("logprob-volume", "/v1/completions", {"prompt": [IDS] * 64, "max_tokens": 0, "echo": True, "logprobs": 20},
         400),
        ("model-echo", "/v1/completions", {"prompt": "hi", "model": "m" * MiB}, 404),
        ("small-echo", "/v1/completions", {"prompt": [IDS[:60]] * 2, "max_tokens": 1, "echo": True, "logprobs": 5},
         200),
    ]
    big = json.dumps({"prompt": TEXT * (10 * MiB // len(TEXT))}).encode()  # 10 MiB
    huge = json.dumps({"prompt": TEXT * (20 * MiB // len(TEXT))}).encode()  # 20 MiB: over the soak's 16 MiB limit
    return [(c, p, json.dumps(b).encode(), s) for c, p, b, s in cases] + [
        ("bad-json", "/v1/completions", b"{not json", 400),
        ("10MiB", "/tokenize", big, 200),  # tokenized (~3.7M tokens), off the event loop
        ("10MiB", "/v1/completions", big, 400),  # tokenized, then longer than the context
        ("over-limit", "/v1/completions", huge, 413),
    ]


def half_sent(port: int, n: int = 60) -> list[socket.socket]:
    """Connections that send nothing, half a header, or headers and half a body."""
    heads = [b"", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-le",
             b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\n{\"prompt\": "]
    out = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if heads[i % 3]:
            s.sendall(heads[i % 3])
        out.append(s)
    return out


def still_open(sockets: list[socket.socket]) -> int:
    n = 0
    for s in sockets:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
        except BlockingIOError:
            n += 1  # nothing to read, and not closed
        except OSError:
            pass
        s.close()
    return n


async def disconnecting_streams(base: str, counts: collections.Counter, n: int = 8) -> None:
    async def one():
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            body = {"prompt": "the", "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                counts[str(r.status_code)] += 1
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return  # hang up after the first token

    await asyncio.gather(*(one() for _ in range(n)))


async def run(base: str, port: int, rounds: int, cases) -> dict:
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    timeline, unexpected, left_open = [], [], 0
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        for round_ in range(rounds):
            sockets = half_sent(port)
            opened = time.monotonic()
            for category, path, body, expected in cases:
                if category == "10MiB" and round_:
                    continue  # seconds of tokenizing each: once is the point, twice only lengthens the soak
                started = time.monotonic()
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
                timeline.append((category, path, started, time.monotonic()))
                tally[category][str(r.status_code)] += 1
                if r.status_code != expected:
                    unexpected.append((category, path, r.status_code, r.text[:200]))
            await disconnecting_streams(base, tally["disconnect"])
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - opened)))  # past both of the soak's timeouts
            n = still_open(sockets)
            tally["half-sent"]["closed"] += len(sockets) - n
            left_open += n
    return {"tally": {c: dict(v) for c, v in tally.items()}, "timeline": timeline, "unexpected": unexpected,
            "left_open": left_open}


def main() -> None:
    base, port, rounds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cases = bodies()
    print("ready", flush=True)
    sys.stdin.readline()
    result = asyncio.run(run(base, port, rounds, cases))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
