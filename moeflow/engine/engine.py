"""LLMEngine: the step loop. add_request / step / abort_request, with continuous batching.

Each `step` runs one scheduled batch (a prefill of newly admitted sequences, or one decode
token for the running sequences the scheduling policy picked) and returns an output for
every sequence it advanced. Around the model run, in order: the predictor forecasts the
step's experts and the planner turns that into prefetches (engine/forecast.py); the model runs
(graphed or eager) and fills the RouteRecord; the sampler draws the tokens; after the step's one
token sync the record is read and shown to the cache statistics, the predictor, the scheduling
policy and any route listener.

With `overlap_output` (the default on CUDA) the host builds a step's outputs (detokenisation and the
RequestOutputs) while the device runs the next step, instead of between the two with the device idle: `step`
then returns the outputs of the step before the one it ran, and a call with nothing left to run returns the
last step's. Everything the next step depends on (the tokens, the finish of a sequence, its KV row, the
routes) is still settled at the token sync, so the tokens are the same either way.

With `async_scheduling` (also the default on CUDA) the next step is launched before the step in flight is
settled, and the host settles it while the device runs the next: engine/inflight.py says how, and where it
applies.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from moeflow.config import CacheConfig, EngineConfig
from moeflow.engine.cuda_graphs import batch_buckets, capture_decode_graphs
from moeflow.engine.forecast import Forecast
from moeflow.engine.inflight import LaunchedStep, async_blocker, reads_logits
from moeflow.engine.kv_cache import KVCache
from moeflow.engine.model_runner import ModelRunner
from moeflow.engine.requests import new_sequence
from moeflow.engine.scheduler import MeasuredCosts, ScheduledBatch, Scheduler, SchedulerContext, SchedulingPolicy
from moeflow.engine.sequence import Sequence
from moeflow.engine.setup import (budget_slots, check_planner_options, named_policy, named_predictor, named_selector,
                                  resolve_device, resolve_dtype, resolve_fused, resolve_max_model_len,
                                  resolve_overlap)
from moeflow.engine.stats import count_step, new_counters
from moeflow.engine.warmup import warm_prefill
from moeflow.errors import RequestError
from moeflow.experts.cache import ExpertCache
from moeflow.experts.compute import CachedExperts
from moeflow.experts.planning import Planner
from moeflow.experts.policies import make_policy
from moeflow.experts.store import ExpertStore
from moeflow.models.model import MoEModel
from moeflow.outputs import RequestOutput
from moeflow.routing.predictors import Predictor, StepView
from moeflow.routing.record import RouteRecord, StepRoutes
from moeflow.routing.selection import Selector
from moeflow.sampling import Sampler, SamplingParams
from moeflow.tokenizer import Tokenizer
from moeflow.weights.checkpoint import Checkpoint
from moeflow.weights.synthetic import SyntheticCheckpoint

RouteListener = Callable[[StepView, StepRoutes], None]
log = logging.getLogger("moeflow.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig, *, skip_tokenizer_init: bool = False,
                 checkpoint: Checkpoint | SyntheticCheckpoint | None = None, predictor: Predictor | None = None,
                 scheduling: SchedulingPolicy | None = None):
        """`checkpoint` replaces the directory `config.model` names (a synthetic model for benchmarks);
        `predictor` and `scheduling` replace what config.predictor and config.scheduler name."""
        self.config = config
        self.scheduler: Scheduler | None = None  # none until set-up is done: nothing can be running
        self.cache: ExpertCache | None = None
        self._unemitted: list[Sequence] = []  # the last step's sequences, whose outputs are not built yet
        self._in_flight: LaunchedStep | None = None  # a step launched, not yet settled (async_scheduling)
        self._ready: list[RequestOutput] = []  # outputs built but not yet returned (a step that failed after)
        self.device = resolve_device(config.device)
        self.checkpoint = checkpoint if checkpoint is not None else Checkpoint(
            config.model, allow_nonfinite=config.allow_nonfinite_weights)
        self.spec = spec = self.checkpoint.spec
        self.dtype = resolve_dtype(config.dtype, spec, self.device)
        self.max_model_len = resolve_max_model_len(config.max_model_len, spec)
        self.max_batch_size = config.decode_batch_size
        self.tokenizer = None if skip_tokenizer_init else Tokenizer(config.model)
        self.eos_ids = set(spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        self.store = ExpertStore(self.checkpoint, spec, self.dtype, pin=self.device.type == "cuda", read_all=True,
                                 allow_nonfinite=config.allow_nonfinite_weights)
        weight_dtype = self.dtype if spec.router.weights_in_model_dtype else torch.float32
        capacity = max(config.max_num_batched_tokens, self.max_model_len, batch_buckets(self.max_batch_size)[-1])
        self.record = RouteRecord(spec.num_moe_layers, spec.router.top_k, spec.num_experts, capacity, weight_dtype,
                                  self.device)
        self.model = MoEModel(spec, self.checkpoint, self.dtype, self.device, self.max_model_len, self.record,
                              fused=resolve_fused(config.fused_ops, self.device), gate_ahead=config.gate_ahead)
        self.kv = KVCache(spec.num_layers, config.max_num_seqs, spec.num_kv_heads, self.max_model_len,
                          spec.head_dim, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        self.forecast = Forecast(self.record, spec.num_moe_layers, self.model.ahead_gate)
        self.set_predictor(predictor if predictor is not None else named_predictor(config, spec, self.checkpoint, self.device,
                                                                        self.model.w["model.embed_tokens.weight"]))
        check_planner_options(config, self.predictor, self.planner)
        self.selector: Selector | None = named_selector(config, spec)
        self.graph_captures = 0  # decode graphs captured over the engine's life
        self.graph_capture_s = 0.0
        self.warmup_s = 0.0  # the prefill warm-up's seconds, for the current expert pool (warmup.py)
        self.graph_memory_bytes = 0  # device memory the current graphs hold
        self.reset_expert_cache(config.cache)
        policy = scheduling if scheduling is not None else named_policy(config)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, self.max_batch_size, policy)
        self.sampler = Sampler(spec.vocab_size, config.max_num_seqs, self.device)
        self._seeds = np.random.default_rng(config.seed)  # a seed for every request that brings none
        self._seqs: dict[str, Sequence] = {}
        self._listeners: list[RouteListener] = []
        self._step_index = 0
        self._decode_launches = 0  # decode steps launched so far
        self.costs = MeasuredCosts(expert_bytes=self.store.expert_bytes)
        self.counters = new_counters()
        self._overlap_output = resolve_overlap(config.overlap_output, self.device)
        self._async_scheduling = resolve_overlap(config.async_scheduling, self.device)
        self._last_settled = 0.0  # perf_counter when the last step was settled
        if config.async_scheduling and self.async_blocker() is not None:  # asked for, not the default
            log.warning("async_scheduling has no effect on this engine: %s; every step is settled before the "
                        "next is planned", self.async_blocker())

    # -- set-up --------------------------------------------------------------------------------

    def reset_expert_cache(self, cache_config: CacheConfig) -> None:
        """Start from an empty expert cache of a new budget and policy (a fully resident one starts full; the
        host store is kept). A pool of the size it already has is emptied in place, and its CUDA graphs kept."""
        self._refuse_while_running("the expert cache can only be replaced")
        num_slots = budget_slots(self.spec, self.store.expert_bytes, cache_config.budget)
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
        self.cache = self.forecast.cache = ExpertCache(self.store, num_slots, self.device, policy)
        self.model.experts = CachedExperts(self.cache)
        self.model.experts.route_listener = self._on_layer_routed
        self.runner.slot_table = None if self.cache.fully_resident else self.cache.slot_table
        self._capture_graphs()
        if self.device.type == "cuda":  # so that the first requests pay no one-time prefill cost
            self.warmup_s = warm_prefill(self, cache_config)

    def set_predictor(self, predictor: Predictor | None, planner: Planner | None = None) -> None:
        """Install a predictor (None: load on demand) and the planner that turns its scores into cache moves
        (default: ExpertFlow's predictive cache for a learned predictor, with config.expert_rounds' rounds by value
        and config.prefetch_margin, and plain prefetching for the others).
        The decode graphs stay as they are: a predictor runs around the step and never inside it; on CUDA a
        predictor that can (the learned one) captures its own forward as graphs, one per batch bucket."""
        self._refuse_while_running("the predictor can only be replaced")
        graphed = self.device.type == "cuda" and not self.config.enforce_eager
        self.forecast.install(predictor, planner, batch_buckets(self.max_batch_size) if graphed else (),
                              self.config.expert_rounds, self.config.prefetch_margin)

    @property
    def predictor(self) -> Predictor | None:
        return self.forecast.predictor

    @property
    def planner(self) -> Planner:
        """What turns the predictor's forecasts into cache moves; replaceable while no request runs."""
        return self.forecast.planner

    @planner.setter
    def planner(self, planner: Planner) -> None:
        self._refuse_while_running("the planner can only be replaced")
        self.forecast.planner = planner

    def set_selector(self, selector: Selector | None) -> None:
        """Offer an approximate selector to requests that ask for it (SamplingParams.routing); decode graphs are
        captured again with a variant that runs it."""
        self._refuse_while_running("the selector can only be replaced")
        self.selector = selector
        self.runner.graphs = None
        self._capture_graphs()

    def set_scheduling(self, policy: SchedulingPolicy) -> None:
        """Replace the scheduling policy (only while no request is running)."""
        self._refuse_while_running("the scheduling policy can only be replaced")
        self.scheduler.policy = policy

    @property
    def overlap_output(self) -> bool:
        """Whether `step` builds a step's outputs while the next one runs, and so returns them a step late."""
        return self._overlap_output

    @overlap_output.setter
    def overlap_output(self, value: bool | None) -> None:
        """True or False; None: the engine's default (EngineConfig.overlap_output, else on CUDA)."""
        self._overlap_output = self._switch("overlap_output", value, self.config.overlap_output)

    @property
    def async_scheduling(self) -> bool:
        """Whether a step may be planned and launched before the host has taken the last one's tokens."""
        return self._async_scheduling

    @async_scheduling.setter
    def async_scheduling(self, value: bool | None) -> None:
        """True or False; None: the engine's default (EngineConfig.async_scheduling, else on CUDA)."""
        self._async_scheduling = self._switch("async_scheduling", value, self.config.async_scheduling)

    def _switch(self, name: str, value: bool | None, configured: bool | None) -> bool:
        """A switch's new value, set while no request runs: `value`, or for None the engine's default."""
        self._refuse_while_running(f"{name} can only be changed")
        return bool(value) if value is not None else resolve_overlap(configured, self.device)

    def _refuse_while_running(self, what: str) -> None:
        if self.has_unfinished_requests():
            raise RequestError(f"{what} while no request is running")

    def add_route_listener(self, listener: RouteListener) -> Callable[[], None]:
        """Call `listener(step, routes)` after every step; returns the call that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _capture_graphs(self) -> None:
        """Capture every decode graph the engine will replay, now (on CUDA, unless eager is asked for)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            self.runner.graphs = None
            return
        self.runner.graphs = None  # the graphs being replaced give their memory back first
        graphs, self.graph_memory_bytes = capture_decode_graphs(
            self.model, self.kv, self.model.experts, self.cache.fully_resident, self.device, self.max_batch_size,
            self.max_model_len, self.selector)
        self.graph_captures += graphs.captures
        self.graph_capture_s += graphs.capturer.capture_s
        self.runner.graphs = graphs
        log.info("captured %d decode graphs (batch buckets up to %d%s) in %.1f s, %.1f MiB", graphs.captures,
                 self.max_batch_size, ", with LYNX's variant" if self.selector is not None else "",
                 graphs.capturer.capture_s, self.graph_memory_bytes / 2**20)

    @property
    def device_bytes(self) -> int:
        """Bytes the engine holds on its device: expert pool, dense weights, KV cache."""
        return self.cache.pool.numel() * self.cache.pool.element_size() + self.model.dense_bytes() + self.kv.nbytes

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, forced_output: list[int] | None = None) -> None:
        """`forced_output`: teacher forcing. The request's output tokens are these, one per step, instead of
        sampled ones (its logprobs, when asked for, are those of the forced tokens); it runs exactly as a
        request that sampled them would, so a scorer sees real decode batches."""
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        offered = ("exact",) + ((self.selector.name,) if self.selector is not None else ())
        seq = new_sequence(request_id, prompt, params, tokenizer=self.tokenizer, vocab_size=self.spec.vocab_size,
                           max_model_len=self.max_model_len, offered=offered,
                           draw_seed=lambda: int(self._seeds.integers(2**63 - 1)),
                           arrival_time=arrival_time or time.time(),
                           forced_output=forced_output)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if not seq.finished:  # (a finished one whose last output is not built yet has left already)
            seq.finish_reason = "abort"
            self._leave(seq)
        if seq in self._unemitted:  # its output is dropped anyway; without it, nothing may be left unfinished
            self._unemitted = [s for s in self._unemitted if s is not seq]
        return True

    def has_unfinished_requests(self) -> bool:
        """Whether a request is waiting, running, or finished with its last output still to come."""
        return (bool(self._unemitted or self._ready) or self._in_flight is not None
                or self.scheduler is not None and self.scheduler.has_unfinished())

    @property
    def in_flight(self) -> ScheduledBatch | None:
        """The batch of the step launched and not yet settled (async_scheduling), if any."""
        return self._in_flight.batch if self._in_flight is not None else None

    @property
    def next_step_index(self) -> int:
        """The index the next step launched gets (StepView.index)."""
        return self._step_index

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        decodable = None  # the running sequences the next step may decode (None: all of them)
        if self._in_flight is not None:  # not those the step in flight ends by length
            decodable = [s for s in self.scheduler.running if not s.length_ends_ahead(self.max_model_len)]
            if not decodable and not (self.scheduler.waiting and self.kv.num_free):
                self._settle_in_flight()  # nothing to plan before it is settled
                self._emit_unemitted()  # nor any step to build its outputs during
                decodable = None
        ahead = self._in_flight  # launched by the last call and not settled (async_scheduling)
        t = time.perf_counter()
        batch = self.scheduler.schedule(self._scheduler_context(), decodable)
        self.counters["schedule_s"] += time.perf_counter() - t  # host time outside the steps, choosing them
        if batch is None:
            self._settle_in_flight()
            self._emit_unemitted()
            return self._take_ready()
        launched = self._launch(batch)
        if ahead is not None:  # its tokens, routes and outputs, while the device runs the step just launched
            self._settle_in_flight()
        self._emit_unemitted()  # the last settled step's outputs, built while the device runs this one
        if launched.ahead:
            self._in_flight = launched  # settled by the next call, after it launches the step after this one
            return self._take_ready()
        self._settle(launched)
        if not self._overlap_output:
            self._emit_unemitted()
        return self._take_ready()

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Run the step on the device up to its sampled tokens, without waiting for them."""
        t0 = time.perf_counter()
        seqs = batch.seqs
        wall = time.time()
        index = self._step_index
        self._step_index += 1
        # what the predictor sees of the step (built again when it settles if none did: the same, unless a step
        # launched ahead has taken its tokens since)
        view = self.forecast.begin(batch, index)
        decode = not batch.is_prefill
        for s in seqs:
            s.launched(index, self._decode_launches, decode, wall)
            if not decode:
                self.sampler.admit(s.kv_row, s.prompt_ids, s.params)
                self.forecast.admitted(s)
        self._decode_launches += decode
        if not self.cache.fully_resident:
            self.cache.transfer.follow_current_stream()
        self.forecast.plan()
        exact = None
        if self.selector is not None and any(s.params.routing != "exact" for s in seqs):
            exact = [s.params.routing == "exact" for s in seqs]
        logits = self.runner.run(batch, exact, self.selector)
        made = [len(s.output_ids) + s.num_ahead for s in seqs]  # each one's tokens so far, in flight included
        tokens = self.sampler.sample(logits.last, [s.kv_row for s in seqs], [s.params for s in seqs],
                                     [s.seed for s in seqs], made)
        forced = [(i, s.forced[n]) for i, (s, n) in enumerate(zip(seqs, made)) if s.forced is not None]
        if forced:
            at, values = zip(*forced)
            tokens[list(at)] = torch.tensor(values, device=tokens.device)
        self.runner.remember_tokens(logits, tokens)
        for s in seqs:
            s.num_ahead += 1
        launched = LaunchedStep(batch, index, view, logits, tokens, t0)
        if self._async_scheduling and self.async_blocker() is None and not reads_logits(batch):
            launched.copy_for_later(self.model.record)  # the next step may be launched before it is settled
        return launched

    def _settle_in_flight(self) -> None:
        launched, self._in_flight = self._in_flight, None
        if launched is not None:
            self._settle(launched)

    def _settle(self, launched: LaunchedStep) -> None:
        """Take a launched step's tokens (its one device->host sync), then its routes, accounting and each
        sequence's token; its outputs are left to `_emit_unemitted`."""
        batch, logits, seqs = launched.batch, launched.logits, launched.batch.seqs
        if self._unemitted:  # never left behind: this step's sequences replace them below
            self._emit_unemitted()
        token_list = launched.token_list()
        routes = launched.routes(self.model.record)
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is not None or i in logits.prompt:  # most steps ask for none: no slicing
                seq.record_logprobs(logits.last[i : i + 1], launched.tokens[i : i + 1], logits.prompt.get(i))
        # a sequence ended (or aborted) by a token settled since this step was launched: its token here is void
        live = [not s.finished and self._seqs.get(s.request_id) is s for s in seqs]
        now = time.perf_counter()
        self._account(batch, routes, now - max(launched.t0, self._last_settled), sum(live))
        self._last_settled = now
        for i, s in enumerate(seqs):
            s.last_routes = routes.ids[:, logits.rows[i].stop - 1].copy()
        view = launched.view or batch.view(launched.index)
        forecast_s = self.forecast.observe(view, routes)
        if not batch.is_prefill:
            self.counters["predictor_s"] += forecast_s
        self.scheduler.policy.update(view, routes)
        for listener in self._listeners:
            listener(view, routes)
        wall = time.time()
        for seq, token, ok in zip(seqs, token_list, live):
            seq.num_ahead -= 1
            if ok:
                ended = seq.append(token, wall, self.eos_ids, self.max_model_len,
                                   detokenize=not self._overlap_output)
                if ended is not None:
                    self._finish(seq, *ended)
        self._unemitted = [seq for seq, ok in zip(seqs, live) if ok]

    def async_blocker(self) -> str | None:
        """Why no step of this engine can be launched ahead of the last one's settling, as it is set up now
        (None: steps can, unless one asks for logprobs)."""
        return async_blocker(self.cache.fully_resident, self.predictor, self.scheduler.policy)

    def _emit_unemitted(self) -> None:
        """Build the outputs of the sequences the last step advanced (but not of those aborted since)."""
        seqs, self._unemitted = self._unemitted, []
        for seq in seqs:
            if self._seqs.get(seq.request_id) is not seq:
                continue
            seq.detokenize()
            self._ready.append(seq.output())
            if seq.finished:
                del self._seqs[seq.request_id]

    def _take_ready(self) -> list[RequestOutput]:
        outputs, self._ready = self._ready, []
        return outputs

    def _scheduler_context(self) -> SchedulerContext:
        running = self.scheduler.running
        predictions = {}
        if getattr(self.scheduler.policy, "wants_predictions", False) and len(running) > self.max_batch_size:
            predictions = self.forecast.running_predictions(running, self._step_index)
        return SchedulerContext(
            step=self._step_index, free_kv_rows=self.kv.num_free,
            max_num_batched_tokens=self.config.max_num_batched_tokens, max_batch_size=self.max_batch_size,
            residency=None if self.cache.fully_resident else self.cache.residency(),
            signatures=({s.request_id: s.last_routes for s in running if s.last_routes is not None}
                        if getattr(self.scheduler.policy, "reads_routes", True) else {}),
            predictions=predictions, costs=self.costs,
        )

    def _on_layer_routed(self, layer: int, used: list[int]) -> None:
        """An offloaded layer's router has spoken (the host knows its experts): let the planner correct course."""
        self.forecast.layer_routed(layer, used, self.runner.graph_step)

    def _account(self, batch: ScheduledBatch, routes: StepRoutes, elapsed: float, tokens: int) -> None:
        """`tokens`: the step's tokens that count (its live sequences': a void one is not generated)."""
        if self.cache.fully_resident:
            self.cache.count_resident_step(routes.used)
        self.cache.collect_stats()
        self.costs.observe(batch.is_prefill, batch.num_tokens, elapsed)
        count_step(self.counters, batch.is_prefill, batch.num_tokens, tokens, routes, elapsed)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.metrics.finished_time = time.time()
        self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.forecast.finished(seq.request_id)
