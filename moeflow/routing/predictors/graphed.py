"""The learned predictor's forward as CUDA graphs: one per batch bucket, captured once, replayed every step.

Shapes: n rows of features (a decode step's sequences), b the bucket that holds them (n <= b), L*E flat routes.

Run eagerly, one forward of the routing-path predictor is about forty small kernels (two normalised embedding
gathers, four input projections, the MLP and its head), each launched from Python: most of a millisecond of
host time a step on an H100 machine, where the device needs a fraction of that. A graph replays them in one
launch. The features are copied into static buffers first; rows past n are padding (token id -1, whose
embedding is zeros, and no routes) and their outputs are never read.
"""

from __future__ import annotations

import numpy as np
import torch

from moeflow.engine.capture import GraphCapturer
from moeflow.routing.predictors.net import RouteNet, normalized_embedding


def route_logits(net: RouteNet, embedding: torch.Tensor, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """ids [2, n] (each row's token and the token before it, -1 for none), dense [n, 2*L*E] (last routes, route
    history) -> the network's logits [n, 2, L, E]."""
    LE = dense.shape[1] // 2
    return net(normalized_embedding(embedding, ids[0]), normalized_embedding(embedding, ids[1]), dense[:, :LE],
               dense[:, LE:])


class GraphedForward:
    def __init__(self, net: RouteNet, embedding: torch.Tensor, device: torch.device, buckets: tuple[int, ...]):
        self.buckets = tuple(sorted(set(buckets)))
        most = self.buckets[-1]
        LE = net.cfg.num_layers * net.cfg.num_experts
        self._ids = torch.full((2, most), -1, dtype=torch.int64, device=device)
        self._dense = torch.zeros(most, 2 * LE, dtype=torch.float32, device=device)
        capturer = GraphCapturer(device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        for b in reversed(self.buckets):  # the largest first, so the smaller ones reuse its pool's memory
            ids, dense = self._ids[:, :b], self._dense[:b]
            self._graphs[b] = capturer.capture(lambda ids=ids, dense=dense: route_logits(net, embedding, ids, dense))

    def fits(self, n: int) -> bool:
        return 0 < n <= self.buckets[-1]

    def __call__(self, cur: list[int], prev: list[int], dense: np.ndarray) -> torch.Tensor:
        """The logits [n, 2, L, E] (a view of the graph's output, valid until the next call) for n <= the largest
        bucket rows of features."""
        n = len(cur)
        b = next(b for b in self.buckets if b >= n)
        ids = np.full((2, b), -1, dtype=np.int64)
        ids[0, :n], ids[1, :n] = cur, prev
        padded = np.zeros((b, dense.shape[1]), dtype=np.float32)
        padded[:n] = dense
        self._ids[:, :b].copy_(torch.from_numpy(ids))
        self._dense[:b].copy_(torch.from_numpy(padded))
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n]
