"""LLMEngine: the step loop. add_request / step / abort_request, with continuous batching.

Each `step` runs one scheduled batch (a prefill of newly admitted sequences, or one decode
token for every running sequence) and returns an output for every sequence it advanced.
"""

from __future__ import annotations

import gc
import math
import time

import torch

from moeflow.config import CacheConfig, EngineConfig, ExpertBudget, budget_text, format_bytes
from moeflow.engine.cuda_graphs import OffloadedDecodeGraphs, ResidentDecodeGraphs
from moeflow.engine.kv_cache import KVCache
from moeflow.engine.model_runner import ModelRunner
from moeflow.engine.scheduler import POLICIES as SCHEDULING_POLICIES
from moeflow.engine.scheduler import ScheduledBatch, Scheduler
from moeflow.engine.sequence import Sequence
from moeflow.errors import BudgetError, ConfigError, RequestError
from moeflow.experts.cache import ExpertCache
from moeflow.experts.compute import CachedExperts
from moeflow.experts.policies import make_policy
from moeflow.experts.store import ExpertStore
from moeflow.models.model import MoEModel
from moeflow.architectures.spec import ModelSpec
from moeflow.outputs import CompletionOutput, RequestOutput
from moeflow.routing.predictors import NoPredictor, Predictor
from moeflow.routing.selection import ExactSelector
from moeflow.sampling import Sampler, SamplingParams, top_logprobs
from moeflow.tokenizer import IncrementalDetokenizer, Tokenizer
from moeflow.weights.checkpoint import Checkpoint
from moeflow.weights.synthetic import SyntheticCheckpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 4096


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA device; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU, and the checkpoint's half-precision type (else bfloat16) on CUDA."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(spec.torch_dtype, torch.bfloat16) if spec.torch_dtype != "float32" else torch.bfloat16


class LLMEngine:
    def __init__(self, config: EngineConfig, *, skip_tokenizer_init: bool = False,
                 checkpoint: Checkpoint | SyntheticCheckpoint | None = None):
        """`checkpoint` replaces the directory `config.model` names (a synthetic model for benchmarks)."""
        self.config = config
        self.scheduler: Scheduler | None = None  # none until set-up is done: nothing can be running
        self.cache: ExpertCache | None = None
        self.device = resolve_device(config.device)
        self.checkpoint = checkpoint if checkpoint is not None else Checkpoint(
            config.model, allow_nonfinite=config.allow_nonfinite_weights)
        self.spec = spec = self.checkpoint.spec
        self.dtype = resolve_dtype(config.dtype, spec, self.device)
        self.max_model_len = self._resolve_max_model_len(config.max_model_len, spec)
        self.tokenizer = None if skip_tokenizer_init else Tokenizer(config.model)
        self.eos_ids = set(spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        self.store = ExpertStore(self.checkpoint, spec, self.dtype, pin=self.device.type == "cuda", read_all=True,
                                 allow_nonfinite=config.allow_nonfinite_weights)
        self.model = MoEModel(spec, self.checkpoint, self.dtype, self.device, self.max_model_len)
        self.model.selector = ExactSelector()
        self.kv = KVCache(spec.num_layers, config.max_batch_size, spec.num_kv_heads, self.max_model_len,
                          spec.head_dim, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        self.predictor: Predictor = NoPredictor()
        self.reset_expert_cache(config.cache)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, SCHEDULING_POLICIES[config.scheduler]())
        self.sampler = Sampler()
        self._generator = torch.Generator(self.device).manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self.counters = {"prompt_tokens": 0, "generated_tokens": 0, "decode_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}

    # -- set-up --------------------------------------------------------------------------------

    @staticmethod
    def _resolve_max_model_len(asked: int | None, spec: ModelSpec) -> int:
        if asked is None:
            return min(spec.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if asked > spec.max_position_embeddings:
            raise ConfigError(f"max_model_len={asked} exceeds the model's max_position_embeddings="
                              f"{spec.max_position_embeddings}")
        return asked

    def reset_expert_cache(self, cache_config: CacheConfig) -> None:
        """Start from an empty expert cache of a new budget and policy (a fully resident one starts full; the
        host store is kept). A pool of the size it already has is emptied in place, and its CUDA graphs kept."""
        if self.has_unfinished_requests():
            raise RequestError("the expert cache can only be replaced while no request is running")
        num_slots = self._budget_slots(self.store.expert_bytes, cache_config.budget)
        policy = make_policy(cache_config.eviction, self.spec.num_moe_layers, self.spec.num_experts)
        if self.cache is not None and self.cache.num_slots == num_slots:
            # the same pool size: empty it in place (a resident pool stays as it is), keeping the CUDA
            # graphs captured against it, so the next run does not capture them again
            if self.cache.fully_resident:
                self.cache.policy = policy
            else:
                self.cache.clear(policy)
            return
        # free the old pool before the new one is allocated: the captured graphs read it too
        self.cache = self.model.experts = self.runner.graphs = None
        if self.device.type == "cuda":
            gc.collect()  # graphs and caches may sit in reference cycles
            torch.cuda.empty_cache()
        self.cache = ExpertCache(self.store, num_slots, self.device, policy)
        self.model.experts = CachedExperts(self.cache)
        self._configure_graphs()

    def set_predictor(self, predictor: Predictor) -> None:
        """Install a predictor: it is asked before every step and shown every layer's real routes."""
        self.predictor = predictor
        self.model.route_observer = ((lambda layer, routing: predictor.observe(layer, routing.ids))
                                     if predictor.observes_routes else None)
        self._configure_graphs()

    def _configure_graphs(self) -> None:
        """Replay decode steps as CUDA graphs on CUDA, unless something must see every layer in Python."""
        usable = (self.device.type == "cuda" and not self.config.enforce_eager and self.model.route_observer is None
                  and self.model.selector.exact)
        args = (self.model, self.kv)
        sizes = (self.device, self.config.max_batch_size, self.max_model_len)
        if not usable:
            self.runner.graphs = None
        elif self.cache.fully_resident:
            self.runner.graphs = ResidentDecodeGraphs(*args, self.cache, *sizes)
        else:
            self.runner.graphs = OffloadedDecodeGraphs(*args, self.model.experts, *sizes)

    def _budget_slots(self, expert_bytes: int, budget: ExpertBudget) -> int:
        spec = self.spec
        slots = budget.num_slots(expert_bytes=expert_bytes, num_moe_layers=spec.num_moe_layers,
                                 num_experts=spec.num_experts)
        need = spec.router.top_k
        if slots < need:
            total = spec.num_moe_layers * spec.num_experts
            raise BudgetError(
                f"expert budget {budget} buys {slots} slot(s) of {format_bytes(expert_bytes)} each, but one MoE "
                f"layer needs its top-{need} experts on the device at once. The smallest budget that works is "
                f"{need} slots: --expert-budget {budget_text(need * expert_bytes)} "
                f"(or {math.ceil(10000 * need / total) / 100:g}%)"
            )
        return slots

    @property
    def device_bytes(self) -> int:
        """Bytes the engine holds on its device: expert pool, dense weights, KV cache."""
        return self.cache.pool.numel() * self.cache.pool.element_size() + self.model.dense_bytes() + self.kv.nbytes

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens, but the context holds {self.max_model_len} "
                               f"(max_model_len) and at least one must be left to generate")
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        seq = Sequence(request_id, text, ids, params, arrival_time or time.time(), detok, generator)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            if self.tokenizer is None:
                raise RequestError("this engine was started without a tokenizer: pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("a prompt is a string or a list of token ids (ints)")
        if not prompt:
            raise RequestError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})")
        return None, list(prompt)

    def abort_request(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        t0 = time.perf_counter()
        for s in batch.seqs:
            if s.metrics.first_scheduled_time is None:
                s.metrics.first_scheduled_time = time.time()
        self._prefetch(batch)
        logits = self.runner.run(batch)
        tokens = self.sampler.sample(logits.last, [s.params for s in batch.seqs],
                                     [s.generator or self._generator for s in batch.seqs])
        token_list = tokens.tolist()  # the step's one unavoidable device->host sync
        self._record_logprobs(batch, logits, tokens)
        self.cache.collect_stats()
        elapsed = time.perf_counter() - t0
        if batch.is_prefill:
            self.counters["prefill_s"] += elapsed
            self.counters["prompt_tokens"] += batch.num_tokens
        else:
            self.counters["decode_s"] += elapsed
            self.counters["decode_tokens"] += len(token_list)
        self.counters["generated_tokens"] += len(token_list)
        now = time.time()
        outputs = []
        for seq, token in zip(batch.seqs, token_list):
            self._append(seq, token, now)
            outputs.append(self._output(seq))
            if seq.finished:
                self._seqs.pop(seq.request_id, None)
        return outputs

    def _prefetch(self, batch: ScheduledBatch) -> None:
        predictions = self.predictor.predict(batch)
        if not predictions:
            return
        for layer, scores in predictions.items():
            quota = int(self.cache.quota[self.cache.ordinal(layer)])
            self.cache.prefetch(layer, torch.argsort(scores, descending=True)[:quota].tolist())

    def _record_logprobs(self, batch: ScheduledBatch, logits, tokens: torch.Tensor) -> None:
        for i, seq in enumerate(batch.seqs):
            if seq.params.logprobs is not None:
                seq.logprobs.extend(top_logprobs(logits.last[i : i + 1], tokens[i : i + 1], seq.params.logprobs))
            if i in logits.prompt:
                nxt = torch.tensor(seq.prompt_ids[1:], device=self.device)
                seq.prompt_logprobs = [None, *top_logprobs(logits.prompt[i][:-1], nxt, seq.params.prompt_logprobs)]

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        p = seq.params
        seq.output_ids.append(token)
        seq.num_cached = seq.num_tokens - 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        if seq.detokenizer is not None:
            seq.detokenizer.add(token)
            seq.text = seq.detokenizer.text
        if token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif not p.ignore_eos and token in self.eos_ids:
            self._finish(seq, "stop", None)
        elif p.stop and self._hit_stop_string(seq):
            pass
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        for stop in seq.params.stop:
            at = seq.text.find(stop)
            if at >= 0:
                seq.text = seq.text[: at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
                self._finish(seq, "stop", stop)
                return True
        return False

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.metrics.finished_time = time.time()
        self.scheduler.finish(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        # While running, hold back a tail that could still grow into a stop string.
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        visible = len(seq.text) if seq.finished else max(seq.emitted_chars, len(seq.text) - hold)
        new_text = seq.text[seq.emitted_chars : visible]
        seq.emitted_chars = visible
        completion = CompletionOutput(
            index=0, text=seq.text[:visible], token_ids=list(seq.output_ids), finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, logprobs=seq.logprobs, new_text=new_text,
            new_token_ids=seq.output_ids[-1:],
        )
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, [completion], seq.finished, seq.metrics,
                             seq.prompt_logprobs)
