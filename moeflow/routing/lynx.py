"""LYNX's AffinityBinning (arXiv 2411.08982): remap a decode batch's low-affinity picks onto experts the rest
of the batch already uses, so each MoE layer runs fewer distinct experts. Every token still runs K.

Shapes: T rows of the step (padding included), E experts, K top-k; B the number of real rows.

The rule, per layer and decode step, for the rows that asked for it:
  q[b,e] = max(ceil(alpha * (L[b,e] - max_e L[b,e])), -beta)       bins: 0 near the row's best, -beta the tail
  S[e]   = sum over real rows of B ** q[b,e]                          popularity, bin first
  z[b,e] = q[b,e] + (S[e] - B ** q[b,e]) / B                          the rest of the batch reorders inside a bin
  C_b    = the K largest z[b,:];  kept = union of C_b over real LYNX rows, plus every exact row's own picks
  then each row's top-K logits among the kept experts, weighted as the family weights them.

How it is computed here (the same order, exactly, with no rounding to break ties at random):
- z's second term is below 1, so ranking by z is ranking by (q, S - h). S - h counts the other real rows'
  votes bin by bin; each count is below B, so as a base-B number its order is the order of its digit
  vector (votes in bin 0, then bin -1, ...): the same order in any base larger than a count. The code
  uses base T (static), so popularity is an exact int64, with no dependence on B's value at all.
- Ties in z break towards the row's own stronger expert (higher logit), then the lower expert index.
  With one real row, or alpha -> 0 (one bin, uniform popularity), this makes LYNX the exact routing.
- A row whose router picks are all kept keeps them bit for bit (ids and weights): the rule would pick
  the same experts with the same weights, recomputed.
- Changed rows: weights are the softmax of the chosen K logits (float32), times m[b] (the row's original
  top-K probability mass) for families that do not renormalise; then the router's weight dtype.
- Cache-aware (`resident_weight` w, an integer >= 0): each expert resident on the device (slot_table >= 0)
  counts as w extra votes in bin 0, i.e. S'[e] = S[e] + w, and z = q + (S' - h) / (B + w) so that the
  term stays below 1: residency reorders experts inside a row's bin, as popularity does, and never lifts
  an expert over a bin. w = 0 is plain LYNX; w = 1 is worth one other row's near-best vote; a w larger
  than the batch puts resident experts first in every bin. No effect when every expert is resident.

Graph-safe: static shapes, no host synchronisation. Blind to padding: popularity and the kept set count
real rows only, and a padding row (a copy of the last real row before it) takes exactly what that row
takes, since its own logits and the batch's statistics are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from moeflow.architectures.lynx import lynx_defaults
from moeflow.architectures.spec import ModelSpec, RouterSpec
from moeflow.errors import ConfigError
from moeflow.routing import _lynx_triton
from moeflow.routing.router import Routing
from moeflow.routing.selection import SelectionContext

KEY_BITS = 62  # the ranking keys are int64
# rows_per_program "auto": on the H200 the binning spread over programs of 2 rows took 8.7 us a layer at 32 rows
# and 10.9 us at 64 against 12.1 and 16.0 us in one program (4 and 8 rows: slower than 2), and a resident
# decode step with it ran 1.06-1.09x faster at batch 32 and 64 (docs/benchmarks/2026-12-06-h200-session9).
# Below 32 rows only one program has been timed.
SPREAD_ROWS, SPREAD_FROM = 2, 32


@dataclass(frozen=True)
class AffinityBinning:
    """The LYNX selector. alpha > 0: bin width 1/alpha in logits; beta >= 1 (an integer): low bins;
    resident_weight >= 0 (an integer): bin-0 votes an expert resident on the device earns."""

    name: ClassVar[str] = "lynx"
    alpha: float
    beta: int
    router: RouterSpec
    resident_weight: int = 0
    # "triton": the same rule in one launch per layer (routing/_lynx_triton.py), on CUDA; "torch": about thirty
    # tensor operations per layer; "auto": Triton's where it is installed (on the H200 the torch selector cost
    # 20% of a resident batch-32 step and Triton's none: docs/benchmarks/2026-12-02-h200-session3)
    kernel: str = "auto"
    # the Triton kernel's rows per program: None, one program for the whole step; n, the step spread over
    # programs of n rows in two launches (_lynx_triton.affinity_binning); the same ids either way. "auto":
    # SPREAD_ROWS rows a program from SPREAD_FROM rows a step, one program below
    rows_per_program: int | str | None = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LYNX alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, int) or self.beta < 1:
            raise ConfigError(f"LYNX beta must be an integer >= 1, got {self.beta!r}")
        w = self.resident_weight
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"LYNX resident_weight must be an integer >= 0 (bin-0 votes), got {w!r}")
        if self.kernel not in ("auto", "torch", "triton"):
            raise ConfigError(f"LYNX kernel must be 'auto', 'torch' or 'triton', got {self.kernel!r}")
        n = self.rows_per_program
        if n is not None and n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1)):
            raise ConfigError(f"LYNX rows_per_program must be 'auto', None or a power of two (1, 2, 4, ...), "
                              f"got {n!r}")
        if self.kernel == "triton" and not _lynx_triton.available():
            raise ConfigError("LYNX kernel 'triton' needs Triton, which is not installed")

    @classmethod
    def for_spec(cls, spec: ModelSpec, alpha: float | None = None, beta: int | None = None,
                 resident_weight: int = 0, kernel: str = "auto",
                 rows_per_program: int | str | None = "auto") -> AffinityBinning:
        """The selector for a model, at its defaults (`lynx_defaults`) unless alpha or beta is given."""
        a, b = lynx_defaults(spec) if alpha is None or beta is None else (alpha, beta)
        return cls(float(alpha if alpha is not None else a), beta if beta is not None else b, spec.router,
                   resident_weight, kernel, rows_per_program)

    def _key_scale(self, T: int, E: int) -> tuple[int, int]:
        """(T ** beta, M): a vote in bin 0 is worth T ** beta, and M exceeds every popularity score."""
        top = T ** self.beta
        scale = (T + self.resident_weight) * top
        if ((self.beta + 1) * scale * E).bit_length() > KEY_BITS:
            raise ConfigError(f"LYNX beta={self.beta} at {T} rows x {E} experts needs integer keys over 62 bits; "
                              f"use a smaller beta (the published values are 1 to 4)")
        return top, scale

    def rows_for(self, T: int) -> int | None:
        """The Triton kernel's rows per program for a step of T rows (None: one program)."""
        if self.rows_per_program != "auto":
            return self.rows_per_program
        return SPREAD_ROWS if T >= SPREAD_FROM else None

    def runs_kernel(self, on_cuda: bool) -> bool:
        """Whether select() runs the Triton kernel, for logits on CUDA (on_cuda) or elsewhere."""
        return on_cuda and (self.kernel == "triton" or self.kernel == "auto" and _lynx_triton.available())

    def select(self, layer: int, routing: Routing, ctx: SelectionContext) -> Routing:
        if ctx.is_prefill:
            return routing
        logits, router_ids = routing.logits, routing.ids
        T, E = logits.shape
        K = router_ids.shape[1]
        top, scale = self._key_scale(T, E)
        if self.runs_kernel(logits.is_cuda):
            ids, weights = _lynx_triton.affinity_binning(
                logits, router_ids, routing.weights, ctx.real, ctx.exact, ctx.slot_table, self.alpha, self.beta,
                scale, self.resident_weight * top, self.router.normalize, rows_per_program=self.rows_for(T),
                out=ctx.out, kept=ctx.scratch)
            return Routing(ids, weights, logits)
        dev = logits.device
        experts = torch.arange(E, device=dev)
        L = logits.float() + 0.0  # + 0.0 turns -0.0 into 0.0: sorts then see one zero
        # each expert's place in its row by logit (0: the best), ties to the lower index
        order = torch.argsort(L, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, experts.expand(T, E))
        q = torch.ceil((L - L.amax(dim=-1, keepdim=True)) * self.alpha).clamp_(min=-self.beta).long()
        # one row's vote for e, as an integer: T ** (beta + q); S - vote: the other real rows' votes
        votes = torch.pow(T, q + self.beta)
        popularity = (votes * ctx.real[:, None]).sum(dim=0) - votes
        if self.resident_weight and ctx.slot_table is not None:
            popularity = popularity + (self.resident_weight * top) * (ctx.slot_table >= 0).long()
        key = ((q + self.beta) * scale + popularity) * E + (E - 1 - rank)  # unique in a row: no ties left
        candidates = torch.topk(key, K, dim=-1).indices

        real, exact = ctx.real, ctx.exact
        marked = torch.zeros(T, E, dtype=torch.bool, device=dev)
        picked = marked.scatter(1, router_ids, True)
        proposed = marked.scatter(1, candidates, True)
        kept = ((proposed & (real & ~exact)[:, None]) | (picked & (real & exact)[:, None])).any(dim=0)

        # padding rows copy the last real row before them, and take what it takes
        source = torch.where(real, torch.arange(T, device=dev), -1).cummax(dim=0).values
        keep_router = exact[source.clamp(min=0)] | kept[router_ids].all(dim=-1)
        ids = torch.topk(torch.where(kept, E - rank, 0), K, dim=-1).indices  # kept experts, best logit first
        weights = torch.softmax(L.gather(1, ids), dim=-1)
        if not self.router.normalize:  # keep the row's original top-K probability mass
            weights = weights * torch.softmax(L, dim=-1).gather(1, router_ids).sum(dim=-1, keepdim=True)
        weights = weights.to(routing.weights.dtype)
        keep = keep_router[:, None]
        return Routing(torch.where(keep, router_ids, ids), torch.where(keep, routing.weights, weights), logits)
