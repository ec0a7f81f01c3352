"""One measured cell: a moeflow engine at a budget in one configuration, or a transformers baseline.

A cell runs several batches of different requests from a workload (workload.py), each to its full
output length with EOS ignored, so every configuration of a cell does the same work on the same prompts.
Timing is warm: a warm-up batch of other prompts runs first (kernels compiled; CUDA graphs were captured
when the pool was made), and every timed batch of an offloaded cell starts from an expert cache emptied
in place. Figures are the decode phase's, summed over the cell's batches: a step counts as decode when the
engine ran it as one, and its wall time (scheduling included) and expert traffic count with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from moeflow.bench import axes
from moeflow.bench.workload import Request, TextWorkload, load_documents
from moeflow.config import CacheConfig, ExpertBudget
from moeflow.engine.engine import LLMEngine
from moeflow.experts.belady import belady_misses
from moeflow.experts.stats import LayerStats
from moeflow.llm import LLM

WARMUP_TOKENS = 3  # a prefill and two decode steps at the batch's size


@dataclass
class RunResult:
    system: str  # "moeflow", "transformers", "transformers+accelerate"
    budget: str  # expert budget, or the GPU memory a baseline was held to
    batch: int  # requests per batch
    output_len: int
    batches: int = 1  # batches of different prompts the cell ran
    configuration: dict = field(default_factory=dict)  # predictor, routing, scheduling (moeflow)
    prompt_tokens: int = 0  # over all batches
    decode_tokens: int = 0  # tokens made by decode steps (each request's first comes from its prefill)
    decode_steps: int = 0
    ttft_s: float = 0.0  # mean over requests
    decode_s: float = 0.0  # summed over batches
    tpot_s: float = 0.0  # mean over requests: (last token - first token) / (tokens - 1)
    tpot_p99_s: float = 0.0  # the 99th percentile of the same per-request figure
    peak_device_bytes: int = 0
    # decode phase expert traffic (moeflow)
    hits: int = 0
    misses: int = 0
    demand_bytes: int = 0
    prefetches: int = 0
    prefetch_bytes: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    stall_s: float = 0.0  # exposed copy stall of the compute stream
    fully_resident: bool = False
    belady_misses: int | None = None  # an optimal cache of the same slots on the same uses (None: resident)
    expert_bytes: int = 0
    num_slots: int = 0
    layer_steps: int = 0
    distinct_experts: int = 0  # summed over (MoE layer, decode step)
    picks: int = 0
    remapped_picks: int = 0
    graph_captures: int = 0  # decode graphs captured during the timed batches (should be 0)
    predictor_s: float = 0.0  # decode steps' host time in the predictor and the cache planner
    schedule_s: float = 0.0  # decode steps' host time in the scheduler choosing them, outside the steps
    batch_decode: list[tuple[int, float]] = field(default_factory=list)  # per batch: (decode tokens, decode s)
    distinct_tokens: list[int] = field(default_factory=list)  # distinct output tokens, per request
    # per request (moeflow): the most decode steps it sat out in a row (RequestMetrics.max_decode_wait_steps)
    max_decode_waits: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)  # per request, in stream order (not in results.json)
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def batch_tokens_per_s(self) -> list[float]:
        """Each batch's decode tokens/s, in run order (the cell's figure pools them)."""
        return [n / t if t else 0.0 for n, t in self.batch_decode]

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    @property
    def bytes_moved(self) -> int:
        return self.demand_bytes + self.prefetch_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.decode_tokens if self.decode_tokens else 0.0

    @property
    def belady_bytes_per_token(self) -> float | None:
        if self.belady_misses is None or not self.decode_tokens:
            return None
        return self.belady_misses * self.expert_bytes / self.decode_tokens

    @property
    def stall_share(self) -> float:
        return self.stall_s / self.decode_s if self.decode_s else 0.0

    @property
    def distinct_experts_per_layer_step(self) -> float | None:
        return self.distinct_experts / self.layer_steps if self.layer_steps else None

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["outputs"]
        tokens, waits = self.distinct_tokens, self.max_decode_waits
        return d | {"max_decode_wait": max(waits) if waits else None,
                    "max_decode_wait_p99": float(np.percentile(waits, 99)) if waits else None,
                    "decode_tokens_per_s": self.decode_tokens_per_s, "batch_tokens_per_s": self.batch_tokens_per_s,
                    "hit_rate": self.hit_rate, "bytes_moved": self.bytes_moved, "bytes_per_token": self.bytes_per_token,
                    "belady_bytes_per_token": self.belady_bytes_per_token, "stall_share": self.stall_share,
                    "predictor_share": self.predictor_s / self.decode_s if self.decode_s else 0.0,
                    "schedule_share": self.schedule_s / self.decode_s if self.decode_s else 0.0,
                    "distinct_experts_per_layer_step": self.distinct_experts_per_layer_step,
                    "distinct_tokens_mean": float(np.mean(tokens)) if tokens else None,
                    "distinct_tokens_min": min(tokens) if tokens else None}


def text_engine(model: str, corpus: str, max_batch: int, output_len: int = 64, device: str = "auto"):
    """(LLM, TextWorkload): an engine on `model` sized for the text workload's prompts (up to 256 tokens) and
    `output_len` more, bfloat16 on CUDA and float32 elsewhere, and the workload of the corpus in `corpus`; what the
    side-by-side tools under tools/ start from."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    llm = LLM(model, max_model_len=256 + output_len + 8, max_batch_size=max_batch, device=device,
              dtype="bfloat16" if cuda else "float32")
    return llm, TextWorkload(load_documents(corpus), llm.tokenizer.encode, output_len=output_len)


def text_tool_parser(description: str, out_type=str, batch_sizes: str = "1,8",
                     output_len: int = 64) -> argparse.ArgumentParser:
    """The arguments every side-by-side tool under tools/ takes: the model directory, --predictor PRED_DIR,
    --corpus CORPUS_DIR, --out (a file or a folder, as the tool says), --batch-sizes, --output-len and --device
    (the defaults given); each adds its own. `text_tool_engine(args)` then builds what they start from."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model")
    p.add_argument("--predictor", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", type=out_type, required=True)
    p.add_argument("--batch-sizes", default=batch_sizes)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--device", default="auto")
    return p


def text_tool_engine(args: argparse.Namespace) -> tuple[LLM, TextWorkload, list[int], axes.Configuration,
                                                        axes.Configuration]:
    """(LLM, workload, batch sizes, LRU's configuration, the predictor's) for `text_tool_parser`'s arguments."""
    batches = [int(b) for b in args.batch_sizes.split(",")]
    llm, workload = text_engine(args.model, args.corpus, max(batches), args.output_len, args.device)
    lru, pred = axes.listed(["none/exact/fcfs", f"{args.predictor}/exact/fcfs"])
    return llm, workload, batches, lru, pred


def alternate(engine: LLMEngine, arms: dict, budget: str, timed: list[list[Request]], warmup: list[Request],
              rounds: int, tag: dict) -> tuple[dict[str, list[float]], dict[str, RunResult]]:
    """An A/B of a few arms on one engine and the same requests: each round runs every arm once, in turn. `arms`
    maps a name to (its bench Configuration, a set-up called once the configuration is applied: what the A/B
    switches). Prints one JSON line per run (with `tag`); returns every round's decode tokens/s per arm and each
    arm's last RunResult."""
    runs: dict[str, list[float]] = {name: [] for name in arms}
    last: dict[str, RunResult] = {}
    for _ in range(rounds):
        for name, (conf, setup) in arms.items():
            axes.apply(conf, engine)  # a new predictor, with no history, for every run
            setup()
            r = run_moeflow(engine, budget, timed, warmup, configuration=conf.as_dict())
            runs[name].append(r.decode_tokens_per_s)
            last[name] = r
            print(json.dumps({**tag, "arm": name, "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
                              "mb_per_token": round(r.bytes_per_token / 1e6, 2), "stall_share": round(r.stall_share, 4),
                              "predictor_share": round(r.predictor_s / r.decode_s, 4)}), flush=True)
    return runs, last


def arm_columns(runs: dict[str, list[float]], last: dict[str, RunResult]) -> dict:
    """`alternate`'s result as one row's columns: per arm its best and median round, MB per token, stall share and
    predictor share, with Belady's MB per token on the same uses."""
    first = next(iter(last.values()))
    return {"rounds": runs, **{f"{n}_tokens_per_s": max(v) for n, v in runs.items()},
            **{f"{n}_median_tokens_per_s": statistics.median(v) for n, v in runs.items()},
            **{f"{n}_mb_per_token": r.bytes_per_token / 1e6 for n, r in last.items()},
            **{f"{n}_stall_share": r.stall_share for n, r in last.items()},
            **{f"{n}_predictor_share": r.predictor_s / r.decode_s for n, r in last.items()},
            "belady_mb_per_token": (first.belady_bytes_per_token or 0) / 1e6}


def write_ab(path: str, engine: LLMEngine, workload, rounds: int, results: list[dict], **about) -> None:
    """An A/B tool's results as JSON: `about` (model, predictor, ...), the device and torch, the workload, rows."""
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    with open(path, "w") as f:
        json.dump({**about, "device": device, "torch": torch.__version__, "rounds": rounds,
                   "workload": workload.describe(), "results": results}, f, indent=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minus(a: LayerStats, b: LayerStats) -> LayerStats:
    return LayerStats(**{k: getattr(a, k) - getattr(b, k) for k in a.__dataclass_fields__})


def run_moeflow(engine: LLMEngine, budget: str, batches: list[list[Request]], warmup: list[Request] | None = None,
                eviction: str = "lru", configuration: dict | None = None) -> RunResult:
    """Run `batches` one after another at `budget`, each from an empty cache; the engine is already set up
    for the configuration (axes.apply). `warmup` runs first, untimed, WARMUP_TOKENS tokens per request."""
    cache_config = CacheConfig(budget=ExpertBudget.parse(budget), eviction=eviction)
    engine.reset_expert_cache(cache_config)  # a new pool size captures its graphs here, before any timing
    if warmup:
        _drive(engine, [replace(r, params=replace(r.params, max_tokens=min(WARMUP_TOKENS, r.params.max_tokens)))
                        for r in warmup], "warmup")
    result = RunResult(system="moeflow", budget=budget, batch=len(batches[0]),
                       output_len=batches[0][0].params.max_tokens, batches=len(batches),
                       configuration=dict(configuration or {}), expert_bytes=engine.cache.expert_bytes,
                       num_slots=engine.cache.num_slots, fully_resident=engine.cache.fully_resident)
    captures = engine.graph_captures
    ttfts, tpots = [], []
    for j, batch in enumerate(batches):
        if not engine.cache.fully_resident:
            engine.reset_expert_cache(cache_config)  # the same size: emptied in place, graphs kept
        tokens, seconds = result.decode_tokens, result.decode_s
        _timed_batch(engine, batch, f"b{j}", result, ttfts, tpots)
        result.batch_decode.append((result.decode_tokens - tokens, result.decode_s - seconds))
    result.graph_captures = engine.graph_captures - captures
    result.ttft_s = float(np.mean(ttfts))
    result.tpot_s = float(np.mean(tpots)) if tpots else 0.0
    result.tpot_p99_s = float(np.percentile(tpots, 99)) if tpots else 0.0
    return result


def _timed_batch(engine: LLMEngine, batch: list[Request], tag: str, result: RunResult, ttfts: list[float],
                 tpots: list[float]) -> None:
    cache = engine.cache
    steps: list[tuple[bool, np.ndarray]] = []  # per step: prefill?, used [L, E]
    remove = engine.add_route_listener(lambda view, routes: steps.append((view.is_prefill, routes.used.copy())))
    device = engine.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ids = [f"{tag}-{i}" for i in range(len(batch))]
        for rid, r in zip(ids, batch):
            engine.add_request(rid, r.prompt, r.params)
        finished = {}
        first_decode, start_residency = None, None
        decode = LayerStats()
        counters = dict(engine.counters)
        while engine.has_unfinished_requests():
            residency = cache.residency().copy() if first_decode is None and not cache.fully_resident else None
            was_steps, was_prompt = engine.counters["decode_steps"], engine.counters["prompt_tokens"]
            was_stats, was_scheduling = cache.stats.total(), engine.counters["schedule_s"]
            t = time.perf_counter()
            outputs = engine.step()
            dt = time.perf_counter() - t
            settled_decode = engine.counters["decode_steps"] > was_steps
            # (async_scheduling: the call that launches the first decode step settles the prefill)
            launched_decode = engine.in_flight is not None and not engine.in_flight.is_prefill
            if settled_decode or launched_decode:
                if settled_decode and first_decode is None:
                    first_decode, start_residency = len(steps) - 1, residency
                result.decode_s += dt
                result.schedule_s += engine.counters["schedule_s"] - was_scheduling
                decode.add(_minus(cache.stats.total(), was_stats))
            elif outputs and first_decode is not None and engine.counters["prompt_tokens"] == was_prompt:
                result.decode_s += dt  # a call that ran nothing and built the last decode step's outputs
            for o in outputs:
                if o.finished:
                    finished[o.request_id] = o
    finally:
        remove()
    c0, c1 = counters, engine.counters
    result.prompt_tokens += c1["prompt_tokens"] - c0["prompt_tokens"]
    result.decode_tokens += c1["decode_tokens"] - c0["decode_tokens"]
    result.decode_steps += c1["decode_steps"] - c0["decode_steps"]
    result.layer_steps += c1["layer_steps"] - c0["layer_steps"]
    result.distinct_experts += c1["distinct_experts"] - c0["distinct_experts"]
    result.picks += c1["picks"] - c0["picks"]
    result.remapped_picks += c1["remapped_picks"] - c0["remapped_picks"]
    result.predictor_s += c1["predictor_s"] - c0["predictor_s"]
    result.hits += decode.hits
    result.misses += decode.misses
    result.demand_bytes += decode.bytes_moved
    result.prefetches += decode.prefetches
    result.prefetch_bytes += decode.prefetch_bytes
    result.prefetch_hits += decode.prefetch_hits
    result.wasted_prefetches += decode.wasted_prefetches
    result.stall_s += decode.stall_s
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else engine.device_bytes
    result.peak_device_bytes = max(result.peak_device_bytes, peak)
    if not cache.fully_resident and first_decode is not None:
        misses = _belady_decode(steps[first_decode:], start_residency, cache.num_slots)
        result.belady_misses = (result.belady_misses or 0) + misses
    for rid in ids:
        o = finished[rid]
        tokens = o.outputs[0].token_ids
        result.outputs.append(list(tokens))
        result.distinct_tokens.append(len(set(tokens)))
        m = o.metrics
        result.max_decode_waits.append(m.max_decode_wait_steps)
        ttfts.append(m.first_token_time - m.arrival_time)
        if len(tokens) > 1:
            tpots.append((m.last_token_time - m.first_token_time) / (len(tokens) - 1))


def _belady_decode(steps: list[tuple[bool, np.ndarray]], residency: np.ndarray | None, num_slots: int) -> int:
    """An optimal cache's misses over the decode phase: from what the live cache held when decoding began,
    over every (layer, expert) use from then on, counting the misses of decode steps (a prefill that comes
    later, of requests that waited for KV rows, shapes the cache but its misses are not the decode phase's)."""
    uses: list[tuple[int, int]] = []
    counted: list[bool] = []
    for is_prefill, used in steps:
        layers, experts = np.nonzero(used)
        uses.extend(zip(layers.tolist(), experts.tolist()))
        counted.extend([not is_prefill] * len(layers))
    initial = [] if residency is None else list(zip(*(a.tolist() for a in np.nonzero(residency))))
    return belady_misses(uses, num_slots, initial=initial, counted=counted)


def _drive(engine: LLMEngine, requests: list[Request], tag: str) -> None:
    for i, r in enumerate(requests):
        engine.add_request(f"{tag}-{i}", r.prompt, r.params)
    while engine.has_unfinished_requests():
        engine.step()


def run_transformers(model, system: str, budget: str, batches: list[list[Request]], output_len: int,
                     pad_token_id: int = 0) -> RunResult:
    """transformers' own generate on the same requests: prompts left-padded with an attention mask, sampling
    with the requests' temperature and top_p (greedy where they are), EOS ignored. Decode time = the full
    run - a one-token run of the same batch; one warm-up generate first. Its sampler's random stream is not
    moeflow's: seeds cannot match token for token."""
    import transformers as tf

    devices = [p.device for p in model.parameters()]
    device = next((d for d in devices if d.type == "cuda"), devices[0])
    params = batches[0][0].params

    def generate(ids, mask, n: int, seed: int) -> tuple[float, torch.Tensor]:
        sample = not params.greedy
        cfg = tf.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=sample, eos_token_id=None,
                                  pad_token_id=pad_token_id,
                                  **({"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
                                     if sample else {}))
        torch.manual_seed(seed)
        _sync(device)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)
        _sync(device)
        return time.perf_counter() - t, out[:, ids.shape[1]:]

    result = RunResult(system=system, budget=budget, batch=len(batches[0]), output_len=output_len,
                       batches=len(batches))
    first = _left_padded(batches[0], pad_token_id, device)
    generate(*first, 2, 0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttfts, tpots = [], []
    for batch in batches:
        ids, mask = _left_padded(batch, pad_token_id, device)
        seed = batch[0].params.seed or 0
        ttft, _ = generate(ids, mask, 1, seed)
        total, out = generate(ids, mask, output_len, seed)
        decode_s = max(total - ttft, 1e-9)
        result.decode_s += decode_s
        result.decode_tokens += len(batch) * (output_len - 1)
        result.decode_steps += output_len - 1
        result.prompt_tokens += int(mask.sum())
        ttfts.append(ttft)
        tpots.append(decode_s / (output_len - 1))
        for row in out.tolist():
            result.outputs.append(row)
            result.distinct_tokens.append(len(set(row)))
    result.ttft_s, result.tpot_s = float(np.mean(ttfts)), float(np.mean(tpots))
    result.tpot_p99_s = float(np.percentile(tpots, 99))
    result.peak_device_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    result.extra["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    return result


def _left_padded(batch: list[Request], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, longest] prompt ids padded on the left, and the attention mask that hides the padding."""
    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt):] = 1
    return ids.to(device), mask.to(device)
