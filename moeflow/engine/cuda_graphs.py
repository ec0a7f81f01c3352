"""CUDA graphs of decode steps whose experts are all resident.

A resident decode step launches a few hundred small kernels; replaying them as one graph
removes the launch gaps that dominate at small batch sizes. One graph is captured per
(batch bucket, context bucket), lazily, into one shared memory pool.

Inputs live in static buffers sized for the largest bucket. A batch smaller than its bucket
is padded by repeating its last sequence: the copy computes exactly what the original
does (and writes the same keys and values to the same cache row), so the padding changes
neither any output nor the expert counters.
"""

from __future__ import annotations

import torch

from moeflow.engine.kv_cache import KVCache
from moeflow.experts.cache import ExpertCache
from moeflow.models.model import ForwardBatch, MoEModel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 256


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    def __init__(self, model: MoEModel, kv: KVCache, cache: ExpertCache, device: torch.device, max_batch: int,
                 max_len: int):
        self.model, self.kv, self.cache, self.device = model, kv, cache, device
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.context_buckets = tuple(sorted({min(max_len, MIN_CONTEXT_BUCKET << i) for i in range(16)}))
        n = self.batch_buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.kv_rows = torch.zeros(n, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, ids: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step for B sequences."""
        B = len(ids)
        b = bucket(B, self.batch_buckets)
        c = bucket(max(positions) + 1, self.context_buckets)
        pad = b - B
        host = torch.tensor([ids + ids[-1:] * pad, positions + positions[-1:] * pad, rows + rows[-1:] * pad],
                            dtype=torch.int64, pin_memory=True)
        self.input_ids[:b].copy_(host[0], non_blocking=True)
        self.positions[:b].copy_(host[1], non_blocking=True)
        self.kv_rows[:b].copy_(host[2], non_blocking=True)
        torch.add(self.positions[:b], 1, out=self.context_lens[:b])
        if (b, c) not in self._graphs:
            self._graphs[b, c] = self._capture(b, c)
        graph, logits = self._graphs[b, c]
        graph.replay()
        return logits[:B]

    def _batch(self, b: int, c: int) -> ForwardBatch:
        return ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:b], is_prefill=False,
                            kv_rows=[], starts=[], lengths=[1] * b, kv_rows_t=self.kv_rows[:b],
                            context_lens_t=self.context_lens[:b], max_context=c)

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        return self.model.logits(self.model.forward(fb, (self.kv.k, self.kv.v)))

    def _capture(self, b: int, c: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        fb = self._batch(b, c)
        # Warm up on a side stream (lazy kernel compilation, allocator state) as graph capture requires.
        # The warm-up runs the real step: its writes to the KV cache are the same ones the replay makes.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self.cache.uncounted():
            self._forward(fb)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(fb)
        return graph, logits
