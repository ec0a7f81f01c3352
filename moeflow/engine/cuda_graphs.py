"""CUDA graphs of decode steps.

A decode step launches a few hundred small kernels; replaying them as graphs removes the
launch gaps that dominate at small batch sizes. Graphs are captured per (batch bucket,
context bucket), lazily, into one shared memory pool. The first step of a bucket runs its
pieces for real (that run is also the warm-up capture needs) and captures them; later steps
replay.

Inputs live in static buffers sized for the largest bucket. A batch smaller than its bucket
is padded by repeating its last sequence: the copy computes exactly what the original does
(and writes the same keys and values to the same cache row), so the padding changes neither
any output nor which experts a step needs.

- ResidentDecodeGraphs: every expert is resident, so a whole step is one graph.
- OffloadedDecodeGraphs: a step must stop at every router so the host can load the experts
  the router chose. Each stretch between two routers is one graph; the experts of a layer are
  one more graph, replayed at once against the resident experts (while the host reads the
  router's choice) and again after any loads the choice required.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moeflow.engine.kv_cache import KVCache
from moeflow.experts.cache import ExpertCache
from moeflow.experts.compute import CachedExperts
from moeflow.experts.kernels import combine_rows, fused_moe_rows
from moeflow.models.model import ForwardBatch, MoEModel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 256


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


def context_buckets(max_len: int) -> tuple[int, ...]:
    """The context lengths decode attention is padded to: 256, 512, ... and max_len. Every decode step, graph
    or eager, reads its keys and values at one of these lengths, so attention sees a few shapes, not one per
    step (cuDNN's attention, torch's pick on Hopper, plans each new shape at tens of milliseconds)."""
    return tuple(sorted({min(max_len, MIN_CONTEXT_BUCKET << i) for i in range(16)}))


class _DecodeInputs:
    """Static input buffers, and the padded copy of one step's inputs into them."""

    def __init__(self, device: torch.device, max_batch: int, max_len: int):
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.context_buckets = context_buckets(max_len)
        n = self.batch_buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.kv_rows = torch.zeros(n, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int64, device=device)

    def load(self, ids: list[int], positions: list[int], rows: list[int]) -> tuple[int, int]:
        """Copy a step's inputs in, padded; returns its (batch bucket, context bucket)."""
        b = bucket(len(ids), self.batch_buckets)
        c = bucket(max(positions) + 1, self.context_buckets)
        pad = b - len(ids)
        host = torch.tensor([ids + ids[-1:] * pad, positions + positions[-1:] * pad, rows + rows[-1:] * pad],
                            dtype=torch.int64, pin_memory=True)
        self.input_ids[:b].copy_(host[0], non_blocking=True)
        self.positions[:b].copy_(host[1], non_blocking=True)
        self.kv_rows[:b].copy_(host[2], non_blocking=True)
        torch.add(self.positions[:b], 1, out=self.context_lens[:b])
        return b, c

    def batch(self, b: int, c: int) -> ForwardBatch:
        return ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:b], is_prefill=False,
                            kv_rows=[], starts=[], lengths=[1] * b, kv_rows_t=self.kv_rows[:b],
                            context_lens_t=self.context_lens[:b], max_context=c)


class _Capturer:
    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def run_and_capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        """Run `fn` for real on a side stream (the warm-up capture needs), then capture it."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph


class ResidentDecodeGraphs:
    def __init__(self, model: MoEModel, kv: KVCache, cache: ExpertCache, device: torch.device, max_batch: int,
                 max_len: int):
        self.model, self.kv, self.cache = model, kv, cache
        self.inputs = _DecodeInputs(device, max_batch, max_len)
        self.capturer = _Capturer(device)
        self.logits = torch.empty(self.inputs.batch_buckets[-1], model.spec.vocab_size, dtype=torch.float32,
                                  device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(self, ids: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step for B sequences."""
        b, c = self.inputs.load(ids, positions, rows)
        if (b, c) in self._graphs:
            self._graphs[b, c].replay()
        else:
            fb = self.inputs.batch(b, c)

            def step() -> None:
                self.logits[:b].copy_(self.model.logits(self.model.forward(fb, (self.kv.k, self.kv.v))))

            # the capture records the device-side expert counters' updates; the run already made them
            with self.cache.uncounted():
                self._graphs[b, c] = self.capturer.run_and_capture(step)
            self._graphs[b, c].replay()  # the step's real run, counted once
        return self.logits[: len(ids)]


class OffloadedDecodeGraphs:
    def __init__(self, model: MoEModel, kv: KVCache, experts: CachedExperts, device: torch.device, max_batch: int,
                 max_len: int):
        spec = model.spec
        self.model, self.kv, self.experts, self.device = model, kv, experts, device
        self.inputs = _DecodeInputs(device, max_batch, max_len)
        self.capturer = _Capturer(device)
        n, H, K, E = self.inputs.batch_buckets[-1], spec.hidden_size, spec.router.top_k, spec.num_experts
        dtype = model.dtype
        self.h = torch.empty(n, H, dtype=dtype, device=device)  # residual stream between pieces
        self.r = torch.empty(n, H, dtype=dtype, device=device)  # the MoE block's input
        self.ids = torch.zeros(n, K, dtype=torch.int64, device=device)
        self.weights = torch.zeros(n, K, dtype=dtype if spec.router.weights_in_model_dtype else torch.float32,
                                   device=device)
        self.rows = torch.empty(n, K, H, dtype=torch.float32, device=device)
        self.logits = torch.empty(n, spec.vocab_size, dtype=torch.float32, device=device)
        # which experts each MoE layer's router chose, copied to the host inside the graphs
        self.used = torch.zeros(spec.num_moe_layers, E, dtype=torch.uint8, pin_memory=True)
        self.used_np = self.used.numpy()
        self.router_done = torch.cuda.Event()
        self._pieces: dict[tuple[int, int], list[torch.cuda.CUDAGraph]] = {}
        self._expert_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch bucket, MoE layer)

    @property
    def num_graphs(self) -> int:
        return sum(map(len, self._pieces.values())) + len(self._expert_graphs)

    def run(self, ids: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step for B sequences."""
        b, c = self.inputs.load(ids, positions, rows)
        fb = self.inputs.batch(b, c)
        moe_layers = self.model.spec.moe_layers
        pieces = self._pieces.get((b, c))
        captured = []
        for k in range(len(moe_layers) + 1):
            if pieces is None:
                captured.append(self.capturer.run_and_capture(lambda k=k: self._piece(k, b, fb)))
            else:
                pieces[k].replay()
            if k == len(moe_layers):
                break
            self.router_done.record()
            # Enqueue the experts against the slot table as it stands before learning what the
            # router chose: when they are all resident (most layers at small batches) that is the
            # layer's whole work, and the GPU computes while the host checks.
            self.experts.cache.await_resident(moe_layers[k])
            self._experts(b, k)
            self.router_done.synchronize()  # wait for this router's choice, not for the whole device
            needed = np.flatnonzero(self.used_np[k]).tolist()
            self.experts.run_rounds(moe_layers[k], needed, lambda k=k: self._experts(b, k), speculated=True)
        if pieces is None:
            self._pieces[b, c] = captured
        return self.logits[: len(ids)]

    def _piece(self, k: int, b: int, fb: ForwardBatch) -> None:
        """From MoE layer k-1's expert output (embedding for k = 0) to MoE layer k's router (logits at the end)."""
        model, kv = self.model, (self.kv.k, self.kv.v)
        moe_layers = model.spec.moe_layers
        if k == 0:
            h, done = model.embed(fb.input_ids), 0
        else:
            prev = moe_layers[k - 1]
            h = model.add_moe_output(prev, self.h[:b], self.r[:b], combine_rows(self.rows[:b], model.dtype))
            done = prev + 1
        if k == len(moe_layers):
            h = model.dense_layers(done, model.spec.num_layers, h, fb, kv)
            self.logits[:b].copy_(model.logits(model.final_norm(h)))
            return
        h = model.dense_layers(done, moe_layers[k], h, fb, kv)
        h, r, routing = model.attention_and_route(moe_layers[k], h, fb, kv)
        self.h[:b].copy_(h)
        self.r[:b].copy_(r)
        self.ids[:b].copy_(routing.ids)
        self.weights[:b].copy_(routing.weights)
        used = torch.zeros(model.spec.num_experts, dtype=torch.uint8, device=self.device)
        used.index_fill_(0, routing.ids.flatten(), 1)
        self.used[k].copy_(used, non_blocking=True)

    def _experts(self, b: int, k: int) -> None:
        """One round of MoE layer k's experts, reading the device slot table as the cache left it."""
        if (b, k) in self._expert_graphs:
            self._expert_graphs[b, k].replay()
            return
        cache = self.experts.cache
        table = cache.slot_table[k]

        def experts() -> None:
            fused_moe_rows(self.r[:b], table[self.ids[:b]], self.weights[:b], cache.w_gate_up, cache.w_down,
                           self.rows[:b], backend=self.experts.backend)

        self._expert_graphs[b, k] = self.capturer.run_and_capture(experts)
