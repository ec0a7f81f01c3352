"""Replay routes through the real expert cache, with no model: what a cache policy would have hit and moved.

Shapes: L MoE layers, E experts per layer, K top-k, B sequences in a step.

The replay drives the same ExpertCache and the same planner and predictor code the engine runs, on the CPU, over
a fake host store whose experts are three floats each (bytes are counted at the real model's expert size). Per
step, in the engine's order: the predictor predicts, the planner plans; then, layer by layer, the step's
distinct experts are acquired and released in rounds as CachedExperts does, and once a layer's loads are ordered
the predictor refines and the planner corrects; after the step the predictor observes the routes.

Steps come either from a trace (`decode_steps`: B sequences decoded side by side one token per step, a finished
sequence's lane taken by the next, as continuous batching does) or from a real engine run (its StepViews and
StepRoutes, captured with `engine.add_route_listener`), so the engine's own figures can be checked against the
replay. Belady's optimal cache of the same slots is computed on the same uses (moeflow.bench.floors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from moeflow.architectures.spec import ModelSpec
from moeflow.config import ExpertBudget
from moeflow.experts.belady import belady_grouped_misses, belady_misses
from moeflow.experts.cache import ExpertCache
from moeflow.experts.planning import Planner
from moeflow.experts.policies import make_policy
from moeflow.experts.stats import LayerStats
from moeflow.routing.predictors.base import Predictor, RequestView, StepView
from moeflow.routing.record import StepRoutes


class FakeStore:
    """Stands in for ExpertStore: every expert is one shared buffer of three floats; `expert_bytes` is the real
    model's, so the cache's byte counters read as the model's would."""

    def __init__(self, spec: ModelSpec, expert_bytes: int):
        self.layers = spec.moe_layers
        self.num_experts = spec.num_experts
        self.top_k = spec.router.top_k
        self.hidden = self.width = 1
        self.numel = 3
        self.dtype = torch.float32
        self.expert_bytes = expert_bytes
        self._buffer = torch.zeros(self.numel)

    def get(self, layer: int, expert: int) -> torch.Tensor:
        return self._buffer


def pool_at(checkpoint, budget: str) -> tuple[int, int]:
    """(slots, bytes of one expert) of a replay's pool at `budget` for the model `checkpoint` holds: at least one
    token's top-k, as `moeflow predictor eval` sizes it."""
    spec = checkpoint.spec
    expert_bytes = spec.expert_bytes(torch.empty((), dtype=checkpoint.tensor_dtype).element_size())
    slots = ExpertBudget.parse(budget).num_slots(expert_bytes=expert_bytes, num_moe_layers=spec.num_moe_layers,
                                                 num_experts=spec.num_experts)
    return max(spec.router.top_k, slots), expert_bytes


def make_cache(spec: ModelSpec, num_slots: int, expert_bytes: int, eviction: str = "lru") -> ExpertCache:
    return ExpertCache(FakeStore(spec, expert_bytes), num_slots, torch.device("cpu"),
                       make_policy(eviction, spec.num_moe_layers, spec.num_experts))


@dataclass
class ReplayStep:
    view: StepView
    routes: StepRoutes


def lanes(sequences: list[slice], batch_size: int) -> list[np.ndarray]:
    """Decode-like steps over trace rows: `batch_size` lanes, each decoding one sequence a token per step and taking
    the next sequence when its own ends. Returns each step's rows, one per busy lane (in lane order)."""
    lane_seq: list[int | None] = [None] * batch_size
    at = [0] * batch_size
    nxt = 0
    steps: list[np.ndarray] = []
    while True:
        for i in range(batch_size):
            if lane_seq[i] is None and nxt < len(sequences):
                lane_seq[i], at[i] = nxt, 0
                nxt += 1
        busy = [i for i in range(batch_size) if lane_seq[i] is not None]
        if not busy:
            return steps
        steps.append(np.array([sequences[lane_seq[i]].start + at[i] for i in busy], dtype=np.int64))
        for i in busy:
            at[i] += 1
            seq = sequences[lane_seq[i]]
            if seq.start + at[i] >= seq.stop:
                lane_seq[i] = None


def decode_steps(token_ids: np.ndarray, routes: np.ndarray, sequences: list[slice], batch_size: int,
                 num_experts: int, ahead: np.ndarray | None = None) -> list[ReplayStep]:
    """The steps of `lanes` as the engine would show them: StepViews (request id `s<i>` for sequence i) and
    StepRoutes. routes [N, L, K]; ahead [N, L, K]: the gate ahead's guesses, where the trace has them."""
    seq_of = np.full(len(token_ids), -1, dtype=np.int64)
    for i, s in enumerate(sequences):
        seq_of[s] = i
    out = []
    for rows in lanes(sequences, batch_size):
        seqs = seq_of[rows]
        view = StepView(len(out), False, tuple(f"s{q}" for q in seqs), tuple((int(token_ids[r]),) for r in rows),
                        tuple(int(r - sequences[q].start) + 1 for r, q in zip(rows, seqs)))
        out.append(step_of(view, routes[rows], num_experts, None if ahead is None else ahead[rows]))
    return out


def step_of(view: StepView, routes: np.ndarray, num_experts: int, ahead: np.ndarray | None = None) -> ReplayStep:
    """A step of one token per sequence as the engine shows it: `view` and the tokens' routes [n, L, K] (token i
    is sequence i's), with the step's distinct experts per layer (and the gate ahead's guesses [n, L, K])."""
    ids = routes.transpose(1, 0, 2).astype(np.int16)  # [L, n, K]
    L = ids.shape[0]
    used = np.zeros((L, num_experts), dtype=bool)
    np.put_along_axis(used, ids.reshape(L, -1).astype(np.int64), True, axis=1)
    guesses = None if ahead is None else ahead.transpose(1, 0, 2)
    return ReplayStep(view, StepRoutes(ids, ids, used, [slice(b, b + 1) for b in range(ids.shape[1])],
                                       ahead_ids=guesses))


@dataclass
class ReplayResult:
    stats: LayerStats  # summed over layers
    per_layer: dict[int, LayerStats]
    tokens: int  # tokens the steps carried
    uses: int  # (layer-step, distinct expert) pairs

    @property
    def hit_rate(self) -> float:
        n = self.stats.hits + self.stats.misses
        return self.stats.hits / n if n else 1.0

    @property
    def bytes_moved(self) -> int:
        """Demand and prefetch bytes together."""
        return self.stats.total_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0


def replay(steps: Iterable[ReplayStep], cache: ExpertCache, predictor: Predictor | None = None,
           planner: Planner | None = None, on_step: Callable[[int], None] | None = None,
           whole_prediction: bool = True, gate_ahead: bool = False) -> ReplayResult:
    """Run `steps` through `cache` as the engine would, with `predictor` and `planner` (both or neither).
    `whole_prediction`: hand the planner the Prediction itself (False: only its scores array).
    `gate_ahead`: hand a planner that takes them the steps' gate-ahead counts for the next layer, as an engine
    with `gate_ahead=True` does (the steps must carry the guesses: a trace made by `moeflow trace`)."""
    if (predictor is None) != (planner is None):
        raise ValueError("a replay takes a predictor and a planner together, or neither (on-demand loading)")
    steps = list(steps)
    takes_ahead = gate_ahead and planner is not None and planner.uses_ahead
    if takes_ahead and any(st.routes.ahead_ids is None for st in steps):
        raise ValueError("gate_ahead: these steps carry no gate-ahead guesses (traces record them since "
                         "2026-12-05; trace the model again)")
    last_seen: dict[str, int] = {}
    for i, st in enumerate(steps):
        for rid in st.view.request_ids:
            last_seen[rid] = i
    admitted: set[str] = set()
    tokens = uses = 0
    layers = cache.layers
    for i, st in enumerate(steps):
        view, routes = st.view, st.routes
        if predictor is not None:
            for rid, ids in zip(view.request_ids, view.input_ids):
                if rid not in admitted:
                    predictor.admitted(RequestView(rid, tuple(ids)))
                    admitted.add(rid)
        prediction = predictor.predict(view) if predictor is not None else None
        if prediction is not None and not cache.fully_resident:
            planner.plan(cache, prediction if whole_prediction else prediction.scores)
        routed: list[list[int]] = []
        for li, layer in enumerate(layers):
            needed = np.flatnonzero(routes.used[li]).tolist()
            uses += len(needed)
            if cache.fully_resident:
                cache.stats.per_layer[layer].hits += len(needed)
                continue
            todo = needed
            while todo:
                got = cache.acquire(layer, todo)
                if not got:
                    raise RuntimeError(f"expert cache: no slot could be freed for layer {layer}")
                cache.release(list(got.values()), spent=True)
                todo = [e for e in todo if e not in got]
            if prediction is not None:
                routed.append(needed)
                refine = getattr(predictor, "refine", None)
                refined = refine(view, li, routed) if refine is not None else None
                if refined is not None and not whole_prediction:
                    refined = refined.scores
                ahead = None
                if takes_ahead and li + 1 < len(layers):
                    guess = routes.ahead_ids[li + 1].ravel().astype(np.int64)
                    ahead = np.bincount(guess, minlength=cache.num_experts)
                planner.refine(cache, li, needed, refined, ahead=ahead)
        cache.collect_stats()
        tokens += routes.ids.shape[1]
        if predictor is not None:
            predictor.observe(view, routes)
            for rid in view.request_ids:
                if last_seen[rid] == i:
                    predictor.finished(rid)
        if on_step is not None:
            on_step(i)
    per_layer = {layer: s for layer, s in cache.stats.per_layer.items()}
    return ReplayResult(cache.stats.total(), per_layer, tokens, uses)


def belady(steps: Iterable[ReplayStep], num_slots: int, expert_bytes: int, layers: tuple[int, ...],
           grouped: bool = False) -> ReplayResult:
    """Belady's optimal cache of `num_slots` on the steps' uses (demand only: it never needs to prefetch).
    grouped: each layer-step's experts resident together (belady_grouped_misses), as one kernel computes them;
    by default they are seen one by one, the bound issue 12's targets name."""
    groups: list[list[tuple[int, int]]] = []
    tokens = 0
    for st in steps:
        for li in range(st.routes.used.shape[0]):
            groups.append([(li, int(e)) for e in np.flatnonzero(st.routes.used[li])])
        tokens += st.routes.ids.shape[1]
    uses = sum(len(g) for g in groups)
    misses = (belady_grouped_misses(groups, num_slots) if grouped
              else belady_misses([k for g in groups for k in g], num_slots))
    total = LayerStats(hits=uses - misses, misses=misses, bytes_moved=misses * expert_bytes)
    return ReplayResult(total, {}, tokens, uses)
