"""One measured configuration: a moeflow engine at a budget, or a transformers baseline.

Every run decodes `output_len` tokens greedily for `batch` random prompts of `prompt_len`
tokens, with EOS ignored, so every configuration does the same work. Time to first token
is the prefill step; decode figures cover the remaining output_len - 1 steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from moeflow.bench.floors import belady_misses, flatten
from moeflow.config import CacheConfig, ExpertBudget
from moeflow.engine.engine import LLMEngine
from moeflow.sampling import SamplingParams


@dataclass
class RunResult:
    system: str  # "moeflow", "transformers", "transformers+accelerate"
    budget: str  # expert budget, or the GPU memory a baseline was held to
    batch: int
    prompt_len: int
    output_len: int
    ttft_s: float
    decode_s: float  # the output_len - 1 decode steps
    peak_device_bytes: int
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0  # during decode
    stall_s: float = 0.0  # during decode
    num_slots: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * (self.output_len - 1) / self.decode_s

    @property
    def tpot_s(self) -> float:
        return self.decode_s / (self.output_len - 1)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    def as_dict(self) -> dict:
        return asdict(self) | {"decode_tokens_per_s": self.decode_tokens_per_s, "tpot_s": self.tpot_s,
                               "hit_rate": self.hit_rate}


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, prompt_len), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_moeflow(engine: LLMEngine, budget: str, prompts: list[list[int]], output_len: int, eviction: str = "lru",
                warmup: bool = True) -> RunResult:
    """Decode `prompts` together from an empty cache of `budget`; records the decode phase's expert traffic."""
    cache_config = CacheConfig(budget=ExpertBudget.parse(budget), eviction=eviction)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    if warmup:  # compile kernels and capture graphs for these shapes, outside the timed run
        engine.reset_expert_cache(cache_config)
        _drive(engine, prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), "warmup")
    if not engine.cache.fully_resident or not warmup:
        engine.reset_expert_cache(cache_config)  # offloaded runs start from an empty cache
    cache = engine.cache
    log: list | None = [] if not cache.fully_resident else None
    remove = engine.add_route_listener(lambda step, routes: log.extend(
        (layer, np.flatnonzero(used).tolist()) for layer, used in zip(cache.layers, routes.used))) if log is not None else None
    device = engine.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, p in enumerate(prompts):
        engine.add_request(f"run-{i}", p, params)
    t0 = time.perf_counter()
    engine.step()  # every prompt is admitted in one prefill step (the engine is sized for it)
    ttft = time.perf_counter() - t0
    if engine.num_waiting:
        raise RuntimeError("benchmark batch did not fit one prefill step: raise max_num_batched_tokens")
    before = cache.stats.total()
    prefill_uses = len(flatten(log)) if log is not None else 0
    t1 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    decode_s = time.perf_counter() - t1
    after = cache.stats.total()
    result = RunResult(
        system="moeflow", budget=budget, batch=len(prompts), prompt_len=len(prompts[0]), output_len=output_len,
        ttft_s=ttft, decode_s=decode_s,
        peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else engine.device_bytes,
        hits=after.hits - before.hits, misses=after.misses - before.misses,
        bytes_moved=after.bytes_moved - before.bytes_moved, stall_s=after.stall_s - before.stall_s,
        num_slots=cache.num_slots, extra={"graphs": engine.runner.graphs is not None},
    )
    if log is not None:
        uses = flatten(log)
        result.extra["belady_decode_misses"] = belady_misses(uses, cache.num_slots, count_from=prefill_uses)
    if remove is not None:
        remove()
    return result


def _drive(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, tag: str) -> None:
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    while engine.has_unfinished_requests():
        engine.step()


def run_transformers(model, system: str, budget: str, prompts: list[list[int]], output_len: int) -> RunResult:
    """transformers' own generate, greedy, EOS ignored; decode time = full run - one-token run."""
    import transformers as tf

    device = next(p.device for p in model.parameters() if p.device.type == "cuda")
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        cfg = tf.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        _sync(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, generation_config=cfg)
        _sync(device)
        return time.perf_counter() - t

    generate(2)  # warm-up
    torch.cuda.reset_peak_memory_stats(device)
    ttft = generate(1)
    total = generate(output_len)
    return RunResult(system=system, budget=budget, batch=len(prompts), prompt_len=len(prompts[0]),
                     output_len=output_len, ttft_s=ttft, decode_s=max(total - ttft, 1e-9),
                     peak_device_bytes=torch.cuda.max_memory_allocated(device),
                     extra={"experts_implementation": getattr(model.config, "_experts_implementation", None)})
