"""Routed-expert compute over the slot pool: Dispatch -> Experts -> Combine.

Shapes: T tokens, K top-k, H hidden, I expert width, S slots, E experts per layer.

Each (token, pick) pair produces one weighted row of a [T, K, H] float32 buffer, and the
combine sums each token's K rows in pick order. A row depends only on its token, its
expert's weights and its routing weight, never on which slot holds the expert or on how
many rounds a small cache needed, so the output is the same at every expert budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeflow.experts.cache import ExpertCache
from moeflow.experts.kernels import combine_rows, fused_moe, fused_moe_rows

RouteListener = Callable[[int, list[int]], None]


class CachedExperts:
    """Runs a layer's routed experts through the expert cache.

    `backend` picks the kernel (moeflow.experts.kernels): "auto" is the fused Triton kernel on
    CUDA and the plain-torch reference elsewhere. `route_listener(layer, experts)`, when set, hears
    each offloaded layer's distinct experts once the host knows them and their loads are ordered (where
    a planner corrects its prefetches for the layers still to come); it never changes what runs.

    The listener hears a layer late, on purpose: not as soon as the layer's experts are enqueued, but once
    the next stretch of the model (up to the next router) is enqueued too, just before the host waits for
    that router (`hear_pending`, called here and by the step's runner at its end). Its host work (a
    planner's correction, a few hundred microseconds) then runs while the device computes that stretch,
    where before the device sat idle behind it. It still runs before the next layer's experts are
    acquired, so every choice the cache makes, and so every byte it moves, is the same either way
    (`defer_listener = False` restores the immediate call, for comparison).
    """

    def __init__(self, cache: ExpertCache, backend: str = "auto"):
        self.cache = cache
        self.backend = backend
        self.route_listener: RouteListener | None = None
        self.defer_listener = True
        self._pending: tuple[int, list[int]] | None = None  # the routed layer the listener has not heard yet

    def hear_pending(self) -> None:
        """Tell the route listener about the last routed layer, if it has not heard of it yet."""
        pending, self._pending = self._pending, None
        if pending is not None and self.route_listener is not None:
            self.route_listener(*pending)

    def forget_pending(self) -> None:
        """Drop a routed layer not heard yet (a step that failed midway leaves one behind)."""
        self._pending = None

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.fully_resident:  # no host round trip: the layer's experts sit in its own slice of the pool
            w_gate_up, w_down = cache.layer_weights(layer)
            return fused_moe(x, topk_ids, topk_weights, w_gate_up, w_down, backend=self.backend,
                             tile_slots=cache.num_slots)
        T, K = topk_ids.shape
        self.hear_pending()  # the layer before: its planning overlaps this layer's attention and router
        rows = torch.zeros(T, K, x.shape[-1], dtype=torch.float32, device=x.device)
        table = cache.slot_table[cache.ordinal(layer)]

        def compute() -> None:
            fused_moe_rows(x, table[topk_ids], topk_weights, cache.w_gate_up, cache.w_down, rows,
                           backend=self.backend)

        # The router has spoken: the host must learn which experts to move (one sync per layer).
        self.run_rounds(layer, torch.unique(topk_ids).tolist(), compute)
        return combine_rows(rows, x.dtype)

    def run_rounds(self, layer: int, needed: list[int], compute: Callable[[], None], speculated: bool = False) -> None:
        """Bring `needed` experts of `layer` in, in as many rounds as the pool allows.

        `compute()` runs once per round, after the round's experts are resident and the
        device's slot table says where; picks of experts not resident map to -1 and are
        skipped. (A pick whose expert stayed resident from an earlier round is computed again,
        to the same row: rounds only happen when the pool is smaller than a layer's needs. Its
        slot is read again too, so a later round's refill of it waits for that compute.)

        `speculated`: compute() was already enqueued after `cache.prepare_compute(layer)`, before
        the host knew what the router chose. If it covered every needed expert, that run was the
        whole work; otherwise the rounds below complete it.
        """
        cache = self.cache
        if speculated and cache.computable(layer, needed):
            got = cache.acquire(layer, needed)  # counts the hits; nothing moves
            cache.release(list(got.values()), spent=True)
        else:
            todo = needed
            while todo:
                got = cache.acquire(layer, todo)
                if not got:
                    raise RuntimeError(f"expert cache: no slot could be freed for layer {layer}")
                # the round reads every needed expert the table shows, those kept from an earlier round too (their
                # picks are computed again): a later round may refill any of those slots only after this compute.
                # A round that got them all (the one round of nearly every layer) reads no others.
                read = None if len(got) == len(needed) else cache.live_slots(layer, needed)
                compute()
                cache.release(list(got.values()), spent=True, read=read)
                todo = [e for e in todo if e not in got]
        # heard once the layer's own loads are ordered, so what the listener plans for later layers
        # neither delays nor disturbs them; by default later still (the class docstring says when)
        if self.route_listener is not None:
            self._pending = (layer, needed)
            if not self.defer_listener:
                self.hear_pending()
