"""Start-up warm-up of the prefill path, so that the first requests a server takes pay no one-time cost.

Decode graphs are captured at start-up (cuda_graphs.py); prefill runs eagerly, and its first run in each
kernel regime pays once: the fused expert kernels compile the tile configuration for its token pairs per
slot (experts/kernels/triton_moe.pick_config has three regimes), attention and the dense GEMMs choose and
initialise their kernels, and the caching allocator grows to the step's size. On the H200 the first 32
requests to a fresh server waited 384 ms for a prefill that the same server ran in 73 ms later on
(docs/benchmarks/2026-12-02-h200-serve-text, serve-100-random.json); with this warm-up, 170-177 ms
(docs/benchmarks/2026-12-02-h200-session3).

`warm_prefill` runs the model runner's prefill on dummy prompts whose token counts grow by 4x from 16 to the
step's token budget, through the code a request's prefill takes, and leaves the engine as it found it: the KV
rows it wrote are free (a request's prefill writes its own row from position 0, and decode reads no further
than the sequence's length), the route record is rewritten by the next step, no route listener hears it, and
the expert pool is then reset in place as the engine resets a pool of the same size (`reset_expert_cache`:
contents, statistics and policy new, graphs kept), so nothing that a run measures or decides sees the warm-up.
Tokens are never sampled and no counter moves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.config import CacheConfig
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.sampling import SamplingParams

if TYPE_CHECKING:
    from moeflow.engine.engine import LLMEngine

log = logging.getLogger(__name__)

FIRST = 16  # tokens in the smallest warm-up step
GROWTH = 4


@dataclass
class _Prompt:
    """What the model runner reads of a sequence in a prefill step."""

    prompt_ids: list[int]
    kv_row: int
    params: SamplingParams


def warmup_sizes(budget: int, max_len: int, rows: int) -> list[list[int]]:
    """The prompt lengths of each warm-up step: token counts FIRST, 4*FIRST, ... up to `budget` (the step's token
    budget) and `budget` itself, each cut into prompts no longer than `max_len` over at most `rows` KV rows."""
    totals, t = [], FIRST
    while t < budget:
        totals.append(t)
        t *= GROWTH
    totals.append(budget)
    steps = []
    for total in totals:
        n = min(rows, math.ceil(total / max_len))
        total = min(total, n * max_len)
        lengths = [total // n + (i < total % n) for i in range(n)]
        if not steps or lengths != steps[-1]:
            steps.append(lengths)
    return steps


@torch.inference_mode()
def warm_prefill(engine: LLMEngine, cache_config: CacheConfig) -> float:
    """Run the prefill path once per warm-up size (see the module's text), then reset the pool of `cache_config`
    in place; returns the seconds it took."""
    t0 = time.perf_counter()
    experts, vocab = engine.model.experts, engine.spec.vocab_size
    listener, experts.route_listener = experts.route_listener, None
    params = SamplingParams(max_tokens=1)
    steps = warmup_sizes(engine.config.max_num_batched_tokens, engine.max_model_len, engine.kv.rows)
    try:
        for lengths in steps:
            first = 0
            prompts = []
            for row, n in enumerate(lengths):
                prompts.append(_Prompt([(first + i) * 7919 % vocab for i in range(n)], row, params))
                first += n
            engine.runner.run(ScheduledBatch(prompts, is_prefill=True))
    finally:
        experts.route_listener = listener
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)  # the figure covers the device's work too
    engine.reset_expert_cache(cache_config)  # the same pool size: emptied in place, its graphs kept
    seconds = time.perf_counter() - t0
    log.info("prefill warm-up: %d steps of %d-%d tokens in %.2f s", len(steps), sum(steps[0]), sum(steps[-1]), seconds)
    return seconds
