"""Teacher forcing through the engine: what every accuracy measure of an approximate routing mode shares.

A scored sequence is a prompt and the tokens forced after it. The engine decodes them as it would decode
sampled ones (one token per request per step, `max_num_seqs` requests at a time, a finished request's
place taken by the next at once), so an approximate selector sees real decode batches, padding and all.
Each forced token comes back with its logprob and the model's top-1 token at that place.

Only tokens predicted by a decode step are scored: the first forced token is predicted by the prefill,
which no approximate mode touches, so it is forced but not scored (it would only dilute a difference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moeflow.engine.stats import GenerateStats
from moeflow.errors import ConfigError

ROUTINGS = ("exact", "lynx")


@dataclass(frozen=True)
class Forced:
    """One sequence to score: `prompt` ids, then `forced` ids (at least two: the first is not scored)."""

    key: str
    prompt: list[int]
    forced: list[int]


@dataclass
class Scored:
    """Per scored position (forced[1:]): the forced token's logprob and the model's top-1 token there."""

    logprobs: list[float]
    argmax: list[int]


def check_routings(names: Iterable[str]) -> list[str]:
    names = list(names)
    if not names:
        raise ConfigError("no routing mode given; choose from " + ", ".join(ROUTINGS))
    for name in names:
        if name not in ROUTINGS:
            raise ConfigError(f"routing {name!r} unknown; choose from {', '.join(ROUTINGS)}")
    return names


def check_batch_size(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {n!r}")
    return n


def make_engine(model_dir: str | Path, batch_size: int, max_len: int, *, device: str = "auto",
                dtype: str = "auto", expert_budget: str = "100%", eviction: str = "lru",
                enforce_eager: bool = False, selector=None):
    """An engine that decodes `batch_size` requests of up to `max_len` tokens at once, offering `selector`."""
    from moeflow.config import CacheConfig, EngineConfig, ExpertBudget
    from moeflow.engine.engine import LLMEngine

    check_batch_size(batch_size)
    config = EngineConfig(model=str(model_dir), device=device, dtype=dtype, max_model_len=max_len,
                          max_num_seqs=batch_size, max_num_batched_tokens=max(4096, max_len),
                          cache=CacheConfig(budget=ExpertBudget.parse(expert_budget), eviction=eviction),
                          enforce_eager=enforce_eager)
    engine = LLMEngine(config)
    if selector is not None:
        engine.set_selector(selector)
    return engine


def teacher_force(engine, sequences: Iterable[Forced], routing: str,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, Scored], GenerateStats]:
    """Score every sequence under `routing` ("exact" or the name of the engine's selector), keeping the
    engine's decode batch full (up to its max_num_seqs) while sequences remain. `progress(n)` is told of
    every n tokens scored. The expert cache is emptied first, so runs compare on equal terms."""
    from moeflow.engine.stats import EngineSnapshot
    from moeflow.sampling import SamplingParams

    engine.reset_expert_cache(engine.config.cache)
    pending: Iterator[Forced] = iter(sequences)
    rows = engine.config.max_num_seqs
    scored: dict[str, Scored] = {}
    expected: dict[str, list[int]] = {}
    before = EngineSnapshot.of(engine)
    added: list[str] = []
    try:
        exhausted = False
        while True:
            while not exhausted and engine.num_running + engine.num_waiting < rows:
                seq = next(pending, None)
                if seq is None:
                    exhausted = True
                    break
                if len(seq.forced) < 2:
                    raise ConfigError(f"{seq.key}: at least two forced tokens are needed (the first is not scored)")
                params = SamplingParams(max_tokens=len(seq.forced), temperature=0.0, logprobs=1, ignore_eos=True,
                                        routing=routing)
                engine.add_request(seq.key, seq.prompt, params, forced_output=seq.forced)
                added.append(seq.key)
                expected[seq.key] = seq.forced
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if not out.finished:
                    continue
                c = out.outputs[0]
                if c.finish_reason != "length" or c.token_ids != expected.pop(out.request_id):
                    raise RuntimeError(f"{out.request_id}: the engine did not decode the forced tokens")
                lps, tops = [], []
                for token, lp in zip(c.token_ids[1:], c.logprobs[1:]):
                    lps.append(lp[token])
                    tops.append(max(lp, key=lp.get))
                scored[out.request_id] = Scored(lps, tops)
                if progress is not None:
                    progress(len(lps))
    finally:  # an error: leave no request behind
        for key in added:
            engine.abort_request(key)
    return scored, GenerateStats.between(before, EngineSnapshot.of(engine), 0)


def mean_nll(scored: Iterable[Scored]) -> tuple[float, int]:
    """(mean negative log-likelihood per token, tokens) over every scored position."""
    total, n = 0.0, 0
    for s in scored:
        total -= math.fsum(s.logprobs)
        n += len(s.logprobs)
    return (total / n if n else float("nan")), n


def agreement(a: dict[str, Scored], b: dict[str, Scored]) -> float:
    """Share of scored positions where two runs over the same sequences have the same top-1 token."""
    same = n = 0
    for key, s in a.items():
        t = b[key]
        same += sum(x == y for x, y in zip(s.argmax, t.argmax, strict=True))
        n += len(s.argmax)
    return same / n if n else float("nan")
