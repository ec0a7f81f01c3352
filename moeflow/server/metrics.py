"""Prometheus metrics, in a registry of the server's own (never the process-global one).

Names follow vLLM's (`vllm:num_requests_running` -> `moeflow:num_requests_running`, ...) where
vLLM has one; the expert-cache figures are moeflow's own. Everything but `rejected` and `render`
is called from the engine thread, right after the step whose figures it reads.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from moeflow.outputs import RequestOutput
from moeflow.server.gc_pauses import GCPauses

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's buckets, so dashboards built for it read the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)  # bench serve reads the 0.25 s one
_WAIT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # decode steps
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # bench serve reads 0.05
_CACHE_FIELDS = ("hits", "misses", "bytes_moved", "prefetch_bytes", "stall_s", "prefetch_hits",
                 "wasted_prefetches")


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        m = ("model_name",)
        self.running = Gauge("moeflow:num_requests_running", "Requests in the engine's running batch", m, registry=r)
        self.waiting = Gauge("moeflow:num_requests_waiting", "Requests waiting for a KV row", m, registry=r)
        self.prompt_tokens = Counter("moeflow:prompt_tokens", "Prefilled prompt tokens", m, registry=r)
        self.generation_tokens = Counter("moeflow:generation_tokens", "Generated tokens", m, registry=r)
        self.ttft = Histogram("moeflow:time_to_first_token_seconds", "Arrival to first token", m,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("moeflow:inter_token_latency_seconds", "Time between two tokens of a request", m,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("moeflow:e2e_request_latency_seconds", "Arrival to last token", m,
                             buckets=_E2E_BUCKETS, registry=r)
        self.decode_wait = Histogram("moeflow:request_max_decode_wait_steps", "The most decode steps a finished "
                                     "request sat out between two of its tokens (more running than a step takes: "
                                     "round-robin's share, or route-aware's choice within its bound)", m,
                                     buckets=_WAIT_BUCKETS, registry=r)
        self.success = Counter("moeflow:request_success", "Requests that ended, by reason (stop, length, abort, "
                               "error)", (*m, "finished_reason"), registry=r)
        self.rejections = Counter("moeflow:request_rejected", "Requests refused with 503 (queue_full, draining)",
                                  (*m, "reason"), registry=r)
        layer = (*m, "layer")
        self.cache_hits = Counter("moeflow:expert_cache_hits", "Experts a step needed that were resident", layer,
                                  registry=r)
        self.cache_misses = Counter("moeflow:expert_cache_misses", "Experts a step loaded on demand", layer,
                                    registry=r)
        self.bytes_moved = Counter("moeflow:expert_bytes_moved", "Expert bytes copied host->device (demand loads "
                                   "and prefetches)", (*layer, "kind"), registry=r)
        self.stall = Counter("moeflow:expert_stall_seconds", "Time compute waited for expert loads", layer,
                             registry=r)
        self.prefetch_hits = Counter("moeflow:expert_prefetch_hits", "Prefetched experts a step then used", layer,
                                     registry=r)
        self.wasted_prefetches = Counter("moeflow:expert_prefetch_wasted", "Prefetched experts that left unused",
                                         layer, registry=r)
        self.expert_memory = Gauge("moeflow:expert_device_memory_bytes", "Device memory of the expert slot pool", m,
                                   registry=r)
        self.graph_captures = Gauge("moeflow:cuda_graph_captures", "Decode CUDA graphs captured since start-up "
                                    "(all before serving: a rise while serving is a bug)", m, registry=r)
        self.distinct = Counter("moeflow:decode_distinct_experts", "Distinct experts decode steps ran, summed over "
                                "(MoE layer, step); divide by decode_layer_steps for the mean", m, registry=r)
        self.layer_steps = Counter("moeflow:decode_layer_steps", "(MoE layer, decode step) pairs", m, registry=r)
        self.picks = Counter("moeflow:decode_expert_picks", "(token, pick) pairs of decode steps", m, registry=r)
        self.remapped = Counter("moeflow:decode_remapped_picks", "Picks an approximate selector (LYNX) moved to "
                                "another expert", m, registry=r)
        self.schedule_time = Counter("moeflow:scheduling_seconds", "Host time choosing each step (the scheduling "
                                     "policy and what it reads: residency, the predictor's forecasts), outside the "
                                     "steps' own time", m, registry=r)
        self.predictor_time = Counter("moeflow:predictor_seconds", "Decode steps' host time in the predictor and the "
                                      "expert-cache planner: forecasts and cache moves during each step, and the "
                                      "predictor learning the step's routes after it", m, registry=r)
        self.step_time = Histogram("moeflow:step_duration_seconds", "One engine step, from its launch (once "
                                   "scheduled) to its tokens on the host, by kind (prefill or decode)", (*m, "kind"),
                                   buckets=_STEP_BUCKETS, registry=r)
        self.gc_pause = Histogram("moeflow:gc_pause_seconds", "One garbage collection, which stops every thread, "
                                  "by generation (2: a full one)", (*m, "generation"), buckets=_GC_BUCKETS,
                                  registry=r)
        self.gc = GCPauses()  # the engine client installs it while its thread runs
        self.model_name = model_name
        self._counters = {}
        self._cache: dict[int, tuple] = {}
        self._last_token: dict[str, float] = {}  # request id -> time of its latest token

    def bind(self, engine) -> None:
        """Start counting from the engine's current figures (start-up loads are not traffic)."""
        self._set_expert_memory(engine)
        self._counters = dict(engine.counters)
        self._cache = {layer: _cache_row(s) for layer, s in engine.cache.stats.per_layer.items()}
        for name in ("stop", "length", "abort", "error"):
            self.success.labels(self.model_name, name)
        for reason in ("queue_full", "draining"):
            self.rejections.labels(self.model_name, reason)

    def _set_expert_memory(self, engine) -> None:
        pool = engine.cache.pool  # read each step: the engine may rebuild its cache with another budget
        self.expert_memory.labels(self.model_name).set(pool.numel() * pool.element_size())

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(self.model_name, reason).inc()

    def request_ended(self, request_id: str, reason: str) -> None:
        self._last_token.pop(request_id, None)
        self.success.labels(self.model_name, reason).inc()

    def _take_gc_pauses(self) -> None:
        for generation, seconds in self.gc.take():
            self.gc_pause.labels(self.model_name, str(generation)).observe(seconds)

    def step_done(self, engine, outputs: list[RequestOutput]) -> None:
        name = self.model_name
        self._take_gc_pauses()
        c, before = engine.counters, self._counters
        for counter, key in ((self.prompt_tokens, "prompt_tokens"), (self.generation_tokens, "generated_tokens"),
                             (self.distinct, "distinct_experts"), (self.layer_steps, "layer_steps"),
                             (self.picks, "picks"), (self.remapped, "remapped_picks"),
                             (self.schedule_time, "schedule_s"), (self.predictor_time, "predictor_s")):
            counter.labels(name).inc(max(0, c[key] - before.get(key, 0)))  # the step's share of the engine's total
        for kind in ("prefill", "decode"):  # a step adds its time to one of the two
            spent = c[f"{kind}_s"] - before.get(f"{kind}_s", 0.0)
            if spent > 0:
                self.step_time.labels(name, kind).observe(spent)
        self.graph_captures.labels(name).set(engine.graph_captures)
        self._counters = dict(c)
        for out in outputs:
            t = out.metrics
            previous = self._last_token.get(out.request_id)
            if previous is None:
                self.ttft.labels(name).observe(max(0.0, t.first_token_time - t.arrival_time))
            else:
                self.itl.labels(name).observe(max(0.0, t.last_token_time - previous))
            self._last_token[out.request_id] = t.last_token_time
            if out.finished:
                self.e2e.labels(name).observe(max(0.0, t.finished_time - t.arrival_time))
                self.decode_wait.labels(name).observe(t.max_decode_wait_steps)
                self.request_ended(out.request_id, out.outputs[0].finish_reason or "stop")
        self._set_expert_memory(engine)
        for layer, stats in engine.cache.stats.per_layer.items():
            now = _cache_row(stats)
            before = self._cache.get(layer, (0,) * len(now))
            # a counter that went down means the engine rebuilt its cache: count from the new one's zero
            hits, misses, moved, prefetched, stall, prefetch_hits, wasted = (a - b if a >= b else a
                                                                            for a, b in zip(now, before))
            lab = (name, str(layer))
            self.cache_hits.labels(*lab).inc(hits)
            self.cache_misses.labels(*lab).inc(misses)
            self.bytes_moved.labels(*lab, "demand").inc(moved)
            self.bytes_moved.labels(*lab, "prefetch").inc(prefetched)
            self.stall.labels(*lab).inc(stall)
            self.prefetch_hits.labels(*lab).inc(prefetch_hits)
            self.wasted_prefetches.labels(*lab).inc(wasted)
            self._cache[layer] = now

    def render(self) -> bytes:
        self._take_gc_pauses()
        return generate_latest(self.registry)


def _cache_row(stats) -> tuple:
    return tuple(getattr(stats, f) for f in _CACHE_FIELDS)
