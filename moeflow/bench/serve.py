"""`moeflow bench serve`: load a running OpenAI-compatible server and report latency and throughput.

Streams /v1/completions requests with Poisson arrivals at --request-rate (seeded; `inf` sends
all at once), at most --max-concurrency in flight, and prints vLLM's serving-benchmark table:
request and token throughput, and TTFT, TPOT, ITL and end-to-end latency (mean, median, p90,
p99). --result-file writes the configuration, statistics, per-request records, the date, the
server's model card and (from /metrics, when the server is moeflow) the expert-cache figures
of the run.

Datasets: `random` sends --input-len random token ids from the server's vocabulary and asks
for exactly --output-len tokens (ignore_eos); `jsonl` reads {"prompt": text, "output_len": n}
lines (output_len optional); `text` is the text workload of `moeflow bench offline` (workload.py):
documents of the corpus test split at --data, the domains in turn, tokenised (by --tokenizer, else
by the server's /tokenize) and cut to lengths spread over --min-input-len..--max-input-len, sent as
token ids with temperature 0.8, top_p 0.95 and a seed per request, unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("MOEFLOW_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $MOEFLOW_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests per second, Poisson arrivals; 'inf' sends all at once (default)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--dataset", choices=["random", "jsonl", "text"], default="random")
    p.add_argument("--input-len", type=int, default=32, help="random dataset: prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=32,
                   help="tokens to generate per request (jsonl: unless the line says) (default: %(default)s)")
    p.add_argument("--jsonl", type=Path, default=None, help="jsonl dataset file")
    p.add_argument("--data", type=Path, default=None,
                   help="text dataset: a corpus directory (its test split), a directory of jsonl files or one file")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="text dataset: a directory with the model's tokenizer.json (default: the server's /tokenize)")
    p.add_argument("--min-input-len", type=int, default=64, help="text dataset (default: %(default)s)")
    p.add_argument("--max-input-len", type=int, default=256, help="text dataset (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random dataset: token ids are drawn from [0, N) (default: the server's /v1/models vocab_size)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds prompts, arrival times and the text dataset's per-request seeds (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0.8 for the text dataset, else greedy)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling (default: 0.95 for the text dataset, else the server's)")
    p.add_argument("--result-file", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--disable-tqdm", action="store_true")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens when known (random and text datasets), else 0 until the server says
    output_len: int
    temperature: float = 0.0
    top_p: float | None = None  # None: the server's default
    seed: int | None = None  # None: the server picks one

    def body(self, model: str) -> dict:
        """The /v1/completions request, streamed, EOS ignored."""
        body = {"model": model, "prompt": self.prompt, "max_tokens": self.output_len, "temperature": self.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def _check(args: argparse.Namespace) -> None:
    from moeflow.errors import ConfigError

    if args.num_prompts < 1:
        raise ConfigError("--num-prompts must be at least 1")
    if not args.request_rate > 0:
        raise ConfigError("--request-rate must be positive (or inf)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError("--max-concurrency must be at least 1")
    if args.input_len < 1 or args.output_len < 1:
        raise ConfigError("--input-len and --output-len must be at least 1")
    if args.dataset == "jsonl" and args.jsonl is None:
        raise ConfigError("--dataset jsonl needs --jsonl PATH")
    if args.dataset == "text" and args.data is None:
        raise ConfigError("--dataset text needs --data CORPUS_DIR (or a directory or file of jsonl documents)")


def _sampling(args: argparse.Namespace) -> tuple[float, float | None]:
    text = args.dataset == "text"
    temperature = args.temperature if args.temperature is not None else (0.8 if text else 0.0)
    top_p = args.top_p if args.top_p is not None else (0.95 if text else None)
    return temperature, top_p


def sample_requests(args: argparse.Namespace, vocab_size: int | None,
                    tokenize: Callable[[str], list[int]] | None = None) -> list[BenchRequest]:
    """The run's requests. `tokenize`: the text dataset's tokenizer (text -> token ids)."""
    import random

    from moeflow.errors import ConfigError

    rng = random.Random(args.seed)
    temperature, top_p = _sampling(args)
    if args.dataset == "random":
        if not vocab_size:
            raise ConfigError("the server's /v1/models gives no vocab_size: pass --vocab-size")
        return [BenchRequest([rng.randrange(vocab_size) for _ in range(args.input_len)], args.input_len,
                             args.output_len, temperature, top_p) for _ in range(args.num_prompts)]
    if args.dataset == "text":
        from moeflow.bench.workload import TextWorkload, load_documents

        if tokenize is None:
            raise ConfigError("--dataset text needs a tokenizer: pass --tokenizer DIR")
        workload = TextWorkload(load_documents(args.data), tokenize, min_len=args.min_input_len,
                                max_len=args.max_input_len, output_len=args.output_len, temperature=temperature,
                                top_p=top_p if top_p is not None else 1.0, seed=args.seed, source=str(args.data))
        return [BenchRequest(r.prompt, len(r.prompt), args.output_len, temperature, top_p, r.params.seed)
                for r in workload.requests(0, args.num_prompts)]
    rows = []
    for n, line in enumerate(args.jsonl.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{args.jsonl}:{n}: each line must be an object with a string 'prompt'")
            rows.append(BenchRequest(row["prompt"], 0, int(row.get("output_len", args.output_len)), temperature,
                                     top_p))
    if not rows:
        raise ConfigError(f"{args.jsonl} holds no prompts")
    return [rows[i % len(rows)] for i in range(args.num_prompts)]


def _server_tokenizer(base: str, headers: dict, model: str) -> Callable[[str], list[int]]:
    """text -> token ids by the server's /tokenize (blocking: call it off the event loop)."""
    import urllib.error
    import urllib.request

    from moeflow.errors import MoeflowError

    def tokenize(text: str) -> list[int]:
        data = json.dumps({"model": model, "prompt": text, "add_special_tokens": True}).encode()
        req = urllib.request.Request(f"{base}/tokenize", data=data,
                                     headers={**headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["tokens"]
        except (urllib.error.URLError, KeyError, ValueError) as exc:
            raise MoeflowError(f"{base}/tokenize failed ({exc}); pass --tokenizer DIR to tokenise locally") from None

    return tokenize


def main(args: argparse.Namespace) -> int:
    import asyncio

    _check(args)
    result = asyncio.run(_run(args))
    from moeflow.bench.serve_stats import format_table

    print(format_table(result, request_rate=args.request_rate, max_concurrency=args.max_concurrency))
    cache = result.get("server_expert_cache")
    if cache:
        print(f"server expert cache during the run: {cache['hits']:.0f} hits, {cache['misses']:.0f} misses "
              f"({cache['hit_rate']:.1%}), {cache['bytes_moved'] / 2**20:.1f} MiB moved host->device, "
              f"{cache['stall_s'] * 1e3:.1f} ms stalled")
    for kind, st in result.get("server_steps", {}).items():
        if st["steps"]:
            print(f"server {kind} steps: {st['steps']:.0f}, {st['seconds'] / st['steps'] * 1e3:.1f} ms mean, "
                  f"{st['over_250ms']:.0f} over 250 ms")
    pauses = result.get("server_gc")
    if pauses and pauses["collections"]:
        print(f"server garbage collections: {pauses['collections']:.0f} ({pauses['full']:.0f} full), "
              f"{pauses['seconds'] * 1e3:.1f} ms in all, {pauses['over_50ms']:.0f} over 50 ms")
    if args.result_file:
        args.result_file.write_text(json.dumps(result, indent=2))
        print(f"results written to {args.result_file}", file=sys.stderr)
    return 0 if result["completed"] else 1


async def _run(args: argparse.Namespace) -> dict:
    import asyncio
    import random
    import time
    from datetime import datetime

    import aiohttp
    from tqdm import tqdm

    from moeflow.bench.serve_stats import summarize
    from moeflow.errors import MoeflowError

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:
        try:
            async with session.get(f"{base}/v1/models") as r:
                if r.status != 200:
                    raise MoeflowError(f"{base}/v1/models answered {r.status}: {(await r.text())[:300]}")
                cards = (await r.json())["data"]
        except aiohttp.ClientError as exc:
            raise MoeflowError(f"cannot reach the server at {base}: {exc}") from None
        card = next((c for c in cards if c["id"] == args.model), None) if args.model else (cards or [None])[0]
        if card is None:
            raise MoeflowError(f"the server does not serve model {args.model!r}; it has {[c['id'] for c in cards]}")
        tokenize = None
        if args.dataset == "text":
            if args.tokenizer is not None:
                from moeflow.tokenizer import Tokenizer

                tokenize = Tokenizer(args.tokenizer).encode
            else:
                tokenize = _server_tokenizer(base, headers, card["id"])
        requests = await asyncio.to_thread(sample_requests, args, args.vocab_size or card.get("vocab_size"), tokenize)
        before = await _server_counters(session, base)

        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=args.disable_tqdm)
        rng = random.Random(args.seed + 1)
        start = time.perf_counter()

        async def one(req: BenchRequest):
            if gate is None:
                record = await _send(session, base, card["id"], req, start)
            else:
                async with gate:
                    record = await _send(session, base, card["id"], req, start)
            bar.update(1)
            return record

        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        after = await _server_counters(session, base)

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": "openai-completions",
        "base_url": base,
        "server_model": card,
        "config": {k: _jsonable(v) for k, v in vars(args).items()
                   if not k.startswith("_") and k not in ("api_key", "command", "benchmark")},
        **summarize(records, duration, first_wave=args.max_concurrency or 0),
        "requests": [r.to_json() for r in records],
    }
    if before is not None and after is not None:
        delta = {k: after[k] - before[k] for k in after}
        cache = {k: delta[k] for k in _CACHE_COUNTERS.values()}
        seen = cache["hits"] + cache["misses"]
        result["server_expert_cache"] = {**cache, "hit_rate": cache["hits"] / seen if seen else 1.0}
        result["server_steps"] = {kind: {"steps": delta[f"{kind}_steps"], "seconds": delta[f"{kind}_s"],
                                         "over_250ms": delta[f"{kind}_steps_over_250ms"]}
                                  for kind in ("prefill", "decode")}
        result["server_gc"] = {"collections": delta["gc_collections"], "full": delta["gc_full"],
                               "seconds": delta["gc_s"], "over_50ms": delta["gc_over_50ms"]}
    return result


def _jsonable(value):
    if isinstance(value, Path) or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)  # strict JSON has no Infinity
    return value


async def _send(session, base: str, model: str, req: BenchRequest, t0: float):
    import time

    import aiohttp

    from moeflow.bench.serve_stats import RequestRecord

    body = req.body(model)
    record = RequestRecord(prompt_len=req.prompt_len, max_tokens=req.output_len)
    sent = time.perf_counter()
    record.start_s = sent - t0
    last = sent
    tokens = 0
    try:
        async with session.post(f"{base}/v1/completions", json=body) as r:
            if r.status != 200:
                record.error = f"HTTP {r.status}: {(await r.text())[:300]}"
                return record
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = event["error"].get("message", "error event")
                    return record
                now = time.perf_counter()
                if event.get("choices"):
                    if tokens == 0:
                        record.ttft_s = now - sent
                    else:
                        record.itl_s.append(now - last)
                    last = now
                    tokens += 1
                if event.get("usage"):
                    record.prompt_len = event["usage"]["prompt_tokens"]
                    tokens = event["usage"]["completion_tokens"]
        record.latency_s = time.perf_counter() - sent
        record.output_tokens = tokens
        record.success = tokens > 0
        if not record.success:
            record.error = "no tokens streamed"
    except (aiohttp.ClientError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


_CACHE_COUNTERS = {"moeflow:expert_cache_hits": "hits", "moeflow:expert_cache_misses": "misses",
                   "moeflow:expert_bytes_moved": "bytes_moved", "moeflow:expert_stall_seconds": "stall_s"}


def _histogram(family, label: str, within: float) -> dict[str, tuple[float, float, float]]:
    """A Prometheus histogram's (observations, their sum, observations of at most `within`) per value of `label`."""
    rows: dict[str, list[float]] = {}
    for sample in family.samples:
        row = rows.setdefault(sample.labels.get(label), [0.0, 0.0, 0.0])
        part = sample.name.rsplit("_", 1)[-1]  # count, sum, bucket (or created)
        if part == "count":
            row[0] += sample.value
        elif part == "sum":
            row[1] += sample.value
        elif part == "bucket" and float(sample.labels.get("le", "inf")) == within:
            row[2] += sample.value
    return {k: tuple(v) for k, v in rows.items()}


async def _server_counters(session, base: str) -> dict | None:
    """Totals of moeflow's expert-cache counters, its step-time histogram (steps, seconds and steps over
    250 ms, per kind) and its garbage-collection pauses (collections, full ones, seconds, pauses over 50 ms)
    on the server's /metrics, or None if it has none."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with session.get(f"{base}/metrics") as r:
            if r.status != 200:
                return None
            text = await r.text()
    except (aiohttp.ClientError, UnicodeDecodeError):
        return None
    totals = dict.fromkeys(_CACHE_COUNTERS.values(), 0.0)
    steps, pauses = {}, {}
    found = False
    for family in text_string_to_metric_families(text):
        if family.name in _CACHE_COUNTERS:
            found = True
            totals[_CACHE_COUNTERS[family.name]] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "moeflow:step_duration_seconds":
            steps = _histogram(family, "kind", within=0.25)
        elif family.name == "moeflow:gc_pause_seconds":
            pauses = _histogram(family, "generation", within=0.05)
    for kind in ("prefill", "decode"):
        count, seconds, quick = steps.get(kind, (0.0, 0.0, 0.0))
        totals.update({f"{kind}_steps": count, f"{kind}_s": seconds, f"{kind}_steps_over_250ms": count - quick})
    count, seconds, quick = (sum(column) for column in zip((0.0, 0.0, 0.0), *pauses.values()))
    totals.update(gc_collections=count, gc_full=pauses.get("2", (0.0,))[0], gc_s=seconds, gc_over_50ms=count - quick)
    return totals if found else None
