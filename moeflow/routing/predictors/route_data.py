"""RouteData: the routes of `moeflow trace` files as arrays, token by token, with what a predictor may read before
each token routes (the token, the one before, the previous token's routes, the sequence's route history). The
predictor's training (training.py), its evaluation and the cache replays read traces through it.

Shapes: N trace tokens, L MoE layers, E experts per layer, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moeflow.errors import ConfigError
from moeflow.routing.traces import Trace


@dataclass
class RouteData:
    """Routes of one or more traces, token by token, with what a predictor may read before each token routes."""

    token_ids: np.ndarray  # [N] int64
    prev_ids: np.ndarray  # [N] int64, -1 at a sequence's first token
    routes: np.ndarray  # [N, L, K] int16, the router's top-k
    starts: np.ndarray  # [N] bool: first token of its sequence
    seq_ids: np.ndarray  # [N] int64, unique over the traces joined
    domains: np.ndarray  # [N] int64 index into domain_names
    domain_names: list[str]
    num_experts: int
    ahead: np.ndarray | None = None  # [N, L, K] int16: the gate ahead's guesses, where every trace holds them
    _history: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_traces(cls, traces: Sequence[Trace]) -> RouteData:
        if not traces:
            raise ConfigError("no traces given")
        first = traces[0]
        names: list[str] = []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tok", "prev", "routes", "starts", "seq", "dom")}
        ahead = [t.ahead_ids for t in traces]
        offset = 0
        for t in traces:
            if t.topk_ids.shape[1:] != first.topk_ids.shape[1:] or t.num_experts != first.num_experts:
                raise ConfigError("traces of different models cannot be joined: routes "
                                  f"{list(t.topk_ids.shape[1:])} x {t.num_experts} experts vs "
                                  f"{list(first.topk_ids.shape[1:])} x {first.num_experts}")
            starts = t.positions == 0
            tok = t.token_ids.astype(np.int64)
            prev = np.concatenate([[-1], tok[:-1]])
            prev[starts] = -1
            dom_names = [str(d) for d in t.domain_names]
            for d in dom_names:
                if d not in names:
                    names.append(d)
            remap = np.array([names.index(d) for d in dom_names], dtype=np.int64)
            parts["tok"].append(tok)
            parts["prev"].append(prev)
            parts["routes"].append(t.topk_ids.astype(np.int16))
            parts["starts"].append(starts)
            parts["seq"].append(t.seq_ids.astype(np.int64) + offset)
            parts["dom"].append(remap[t.token_domains().astype(np.int64)])
            offset += int(t.seq_ids.max()) + 1 if t.num_tokens else 0
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        return cls(cat["tok"], cat["prev"], cat["routes"], cat["starts"], cat["seq"], cat["dom"], names,
                   first.num_experts, None if any(a is None for a in ahead) else np.concatenate(ahead))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return self.routes.shape[1]

    @property
    def top_k(self) -> int:
        return self.routes.shape[2]

    def select(self, rows: np.ndarray) -> RouteData:
        """The rows `rows` (whole sequences, in order) as their own RouteData."""
        out = RouteData(self.token_ids[rows], self.prev_ids[rows], self.routes[rows], self.starts[rows],
                        self.seq_ids[rows], self.domains[rows], self.domain_names, self.num_experts,
                        None if self.ahead is None else self.ahead[rows])
        for decay, h in self._history.items():
            out._history[decay] = h[rows]
        return out

    def multi_hot(self, rows: np.ndarray | slice) -> np.ndarray:
        """[n, L, E] float32 indicator of the rows' routes."""
        ids = self.routes[rows].astype(np.int64)
        out = np.zeros(ids.shape[:-1] + (self.num_experts,), dtype=np.float32)
        np.put_along_axis(out, ids, 1.0, axis=-1)
        return out

    def last_multi_hot(self, rows: np.ndarray) -> np.ndarray:
        """[n, L, E]: the routes of each row's previous token (zeros at a sequence's first token)."""
        out = self.multi_hot(np.maximum(rows - 1, 0))
        out[self.starts[rows]] = 0.0
        return out

    def history(self, decay: float) -> np.ndarray:
        """[N, L*E] float16: each token's bias-corrected moving average of its sequence's earlier routes,
        h_t = sum_{j<t} (1-d) d^(t-1-j) m_j / (1 - d^t), zeros at t = 0 (what LearnedPredictor keeps online)."""
        if decay in self._history:
            return self._history[decay]
        N, L, E = self.num_tokens, self.num_layers, self.num_experts
        out = np.zeros((N, L * E), dtype=np.float16)
        idx = np.arange(N)
        pos = idx - np.maximum.accumulate(np.where(self.starts, idx, 0))  # position within the sequence
        by_pos = np.argsort(pos, kind="stable")  # rows of each position, ascending
        bounds = np.searchsorted(pos[by_pos], np.arange(pos.max() + 2))
        ema, prev_rows = None, None  # the raw averages of the previous position's rows
        for p in range(1, int(pos.max()) + 1):
            rows = by_pos[bounds[p] : bounds[p + 1]]
            m = self.multi_hot(rows - 1).reshape(len(rows), -1)
            r = (1 - decay) * m if p == 1 else decay * ema[np.searchsorted(prev_rows, rows - 1)] + (1 - decay) * m
            out[rows] = (r / (1 - decay ** p)).astype(np.float16)
            ema, prev_rows = r, rows
        self._history[decay] = out
        return out

    def sequence_slices(self) -> list[slice]:
        bounds = np.flatnonzero(self.starts)
        ends = np.concatenate([bounds[1:], [self.num_tokens]])
        return [slice(int(a), int(b)) for a, b in zip(bounds, ends)]

    def first_sequences(self, max_tokens: int | None) -> list[slice]:
        """The first whole sequences, up to the one that reaches `max_tokens` (None: all of them)."""
        slices = self.sequence_slices()
        if max_tokens is None:
            return slices
        kept, n = [], 0
        for s in slices:
            if n >= max_tokens:
                break
            kept.append(s)
            n += s.stop - s.start
        return kept
