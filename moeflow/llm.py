"""LLM: the offline facade. Load a model directory, generate for a list of prompts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from moeflow.config import CacheConfig, EngineConfig, ExpertBudget
from moeflow.engine.engine import LLMEngine
from moeflow.errors import RequestError
from moeflow.engine.stats import EngineSnapshot, GenerateStats
from moeflow.outputs import RequestOutput
from moeflow.routing.predictors import Predictor
from moeflow.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate with an MoE model whose experts live in a budgeted device cache.

    >>> llm = LLM("path/to/model", expert_budget="25%")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text, out.stats.decode_tokens_per_s
    """

    def __init__(
        self,
        model: str,
        *,
        expert_budget: str = "100%",
        eviction: str = "lru",
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        max_batch_size: int | None = None,
        max_num_batched_tokens: int = 4096,
        predictor: str | Predictor | None = None,
        scheduling: str = "fcfs",
        max_decode_wait: int = 4,
        max_admit_wait: int | None = None,
        routing_modes: tuple[str, ...] = ("exact", "lynx"),
        seed: int = 0,
        enforce_eager: bool = False,
        fused_ops: bool | None = None,
        gate_ahead: bool = False,
        expert_rounds: int = 0,
        prefetch_margin: float | None = None,
        overlap_output: bool | None = None,
        async_scheduling: bool | None = None,
        skip_tokenizer_init: bool = False,
        allow_nonfinite_weights: bool = False,
    ):
        """max_num_seqs: sequences running at once (KV-cache rows; default max_batch_size, else 16);
        max_batch_size: the most sequences one decode step takes (default max_num_seqs).
        max_decode_wait: with scheduling="route-aware", the most steps a running sequence may sit out beyond its
        round-robin share of the decode steps (fairness: time per output token stays within that of fcfs's).
        max_admit_wait: with scheduling="route-aware" and experts offloaded, the most steps a new request is held
        back so that it is prefilled with others (0: admitted at once; None: max_decode_wait's bound).
        predictor: None (load experts on demand), a built-in name ("previous", "frequency"), or a Predictor.
        routing_modes: what requests may ask for with SamplingParams.routing ("lynx": batch-aware expert reduction,
        approximate; its decode graphs are captured at start-up too).
        fused_ops: run a step's norms, router, QK norm, rotary embedding and KV-cache write as fused kernels
        (models/fused_decode.py), a few launches a layer instead of dozens; None (the default): wherever they can
        run (CUDA with Triton), False: plain torch, True: fused or a ConfigError saying why not.
        gate_ahead: each MoE layer also guesses the next layer's experts with that layer's router, for the
        predictive cache's correction (ExpertFlowPlanner); the tokens are the same either way.
        expert_rounds: with a learned predictor's predictive cache, an offloaded layer whose loads would evict
        experts worth more than ones it already holds computes its experts in rounds of at least this many, the
        experts of each round then making room for the rest (ExpertFlowPlanner's rounds by value; 0, the default:
        off). Fewer bytes cross to the device when a step runs many sequences; the tokens are the same either way.
        prefetch_margin: with a learned predictor's predictive cache, a prefetch may evict only an expert worth less
        than this times the prefetched expert's chance of use (None, the default: the planner's 0.25). Higher
        prefetches more of what a step loads, so that the copies overlap the compute before them rather than wait
        for their layer's router, for some more bytes; the tokens are the same either way.
        overlap_output: build each step's outputs (detokenisation, RequestOutput) while the device runs the next
        step, not between the two; None (the default): on CUDA. The outputs are the same, a step later.
        async_scheduling: plan and launch each decode step before the host has taken the last one's tokens (they
        reach the next step on the device), so the host's work between steps overlaps the device's. It applies
        where nothing that plans a step reads the last one's routes: every expert resident, no predictor, fcfs,
        and no request asking for logprobs; other steps run as usual. A sequence that ends by a stop token or
        string runs one step more, whose token is dropped. The tokens are the same either way. None (the
        default): on CUDA."""
        rows = max_num_seqs if max_num_seqs is not None else (max_batch_size or 16)
        config = EngineConfig(
            model=str(model), device=device, dtype=dtype, max_model_len=max_model_len, max_num_seqs=rows,
            max_batch_size=max_batch_size, max_num_batched_tokens=max_num_batched_tokens,
            cache=CacheConfig(budget=ExpertBudget.parse(expert_budget), eviction=eviction), scheduler=scheduling,
            max_decode_wait=max_decode_wait, max_admit_wait=max_admit_wait,
            routing_modes=tuple(routing_modes),
            predictor=predictor if isinstance(predictor, str) else None, seed=seed, enforce_eager=enforce_eager,
            fused_ops=fused_ops, gate_ahead=gate_ahead, expert_rounds=expert_rounds,
            prefetch_margin=prefetch_margin, overlap_output=overlap_output,
            async_scheduling=async_scheduling, allow_nonfinite_weights=allow_nonfinite_weights,
        )
        self.engine = LLMEngine(config, skip_tokenizer_init=skip_tokenizer_init,
                                predictor=None if predictor is None or isinstance(predictor, str) else predictor)
        self._ids = itertools.count()
        self.last_stats: GenerateStats | None = None

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """The facade over an engine built directly (a synthetic checkpoint, a custom predictor or policy)."""
        llm = cls.__new__(cls)
        llm.engine, llm._ids, llm.last_stats = engine, itertools.count(), None
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> GenerateOutputs:
        """One RequestOutput per prompt, in order; `.stats` holds the call's figures."""
        prompts = self._as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not use_tqdm) as bar:
            ids = []
            for out in self._drive(prompts, params, ids):
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        return GenerateOutputs([finished[rid] for rid in ids], self.last_stats)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs for one prompt as each step produces them; `last_stats` is set once it finishes."""
        yield from self._drive([prompt], [sampling_params or SamplingParams()], [])

    def _drive(self, prompts: list[Prompt], params: list[SamplingParams], ids: list[str]) -> Iterator[RequestOutput]:
        engine = self.engine
        before = EngineSnapshot.of(engine)
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        ids.extend(str(next(self._ids)) for _ in prompts)
        # Validate every prompt before any runs, so a bad one leaves nothing half-done.
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
                added.append(rid)
            pending = set(ids)
            while pending:
                for out in engine.step():
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:  # an error, or a caller that stopped iterating: leave no request behind
            for rid in added:
                engine.abort_request(rid)
        self.last_stats = self._stats(before)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        prompt = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, sampling_params)[0]

    @staticmethod
    def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise RequestError("no prompts given")
        if all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts

    def _stats(self, before: EngineSnapshot) -> GenerateStats:
        engine = self.engine
        if engine.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(engine.device)
        else:
            peak = engine.device_bytes
        return GenerateStats.between(before, EngineSnapshot.of(engine), peak)


class GenerateOutputs(list):
    """`LLM.generate`'s result: a list of RequestOutput, one per prompt, with `.stats` for the call."""

    def __init__(self, outputs: list[RequestOutput], stats: GenerateStats):
        super().__init__(outputs)
        self.stats = stats
