"""CUDA-graph capture as every graphed part of moeflow does it: run once for real, then capture, in one pool."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class GraphCapturer:
    """Captures callables into CUDA graphs that share one memory pool (the largest first, so that smaller ones
    reuse its memory), counting the captures and their time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.capture_s = 0.0

    def capture(self, fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        """Run `fn` for real on a side stream (the warm-up capture needs: every kernel loaded, every lazy
        buffer made), then capture it. Returns the graph and what the captured call returned (tensors the
        graph writes on every replay)."""
        t0 = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        return graph, out

    def run_and_capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        """`capture(fn)`'s graph alone."""
        return self.capture(fn)[0]
