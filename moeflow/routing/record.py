"""RouteRecord: the one place a step's routes are recorded.

Shapes: L MoE layers, N rows (the most tokens one step carries), T tokens in this step, K top-k,
E experts per layer.

Every step, prefill or decode, graphed or eager, writes each MoE layer's routes into static device
buffers: the router writes its top-k straight into them (no copy of its own), and a non-exact selector
writes its rewritten choice beside them. At the end of the step one device-side gather packs what the
host reads (both choices as int16, and each layer's distinct experts) into a staging buffer, and one
copy moves it to pinned host memory on the compute stream. The engine reads it after the step's token
sync, which has already waited for that copy: reading costs no synchronisation of its own.

Offloaded steps need a layer's distinct experts on the host before the step ends (the cache must load
them): `publish_layer` computes them on the device, copies them to the host and records an event that
the host waits on, for that layer alone.

With the next layer's gate on (`MoEModel(gate_ahead=True)`), each MoE layer l < L-1 also scores layer l+1's
experts from its own MoE input (`keep_ahead`): how many real rows' top-k by that score hold each expert. It
is published with layer l's experts, in the same wait: the host learns a guess at layer l+1 one layer early.

Rows a CUDA graph pads its batch with (copies of the last real row) are never counted: `real` marks the
rows that are, and padding rows map to a sink column of the `used` table.

Predictors, schedulers, the cache statistics, traces and benchmarks all read routes here, as a
`StepRoutes` (host numpy arrays); nothing else taps the MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StepRoutes:
    """One step's routes on the host, for the T tokens it carried (numpy views valid until the next step).

    ids [L, T, K]: the experts that ran (the selector's choice); router_ids [L, T, K]: the router's own
    (the same array when no selector rewrote them); used [L, E]: each layer's distinct experts over the real
    rows; rows: for each sequence of the step, the slice of the token axis it owns (decode: one token each).
    """

    ids: np.ndarray
    router_ids: np.ndarray
    used: np.ndarray
    rows: list[slice]
    weights: np.ndarray | None = None  # [L, T, K] float32, only when the record was asked to keep them
    logits: np.ndarray | None = None  # [L, T, E] float32, likewise
    ahead_ids: np.ndarray | None = None  # [L, T, K] the gate ahead's guesses (-1 at layer 0), kept likewise

    @property
    def num_remapped(self) -> int:
        """(token, pick) pairs whose expert the selector changed."""
        if self.ids is self.router_ids:
            return 0
        return int((np.sort(self.ids, axis=-1) != np.sort(self.router_ids, axis=-1)).sum())

    def of_sequence(self, i: int) -> np.ndarray:
        """The experts sequence i's tokens ran, [L, t, K]."""
        return self.ids[:, self.rows[i]]


class RouteRecord:
    def __init__(self, num_layers: int, top_k: int, num_experts: int, capacity: int, weight_dtype: torch.dtype,
                 device: torch.device):
        L, N, K, E = num_layers, capacity, top_k, num_experts
        self.num_layers, self.capacity, self.top_k, self.num_experts = L, N, K, E
        self.device = device
        self.ids = torch.zeros(L, N, K, dtype=torch.int64, device=device)
        self.weights = torch.zeros(L, N, K, dtype=weight_dtype, device=device)
        self.selected_ids = torch.zeros(L, N, K, dtype=torch.int64, device=device)
        self.selected_weights = torch.zeros(L, N, K, dtype=weight_dtype, device=device)
        # topk writes float32 values; where the family keeps weights in the model dtype they are cast after
        self._scratch = torch.zeros(N, K, dtype=torch.float32, device=device)
        # row masks the step's selector reads: real rows (False: graph padding) and rows that must stay exact
        self.real = torch.ones(N, dtype=torch.bool, device=device)
        self.exact = torch.ones(N, dtype=torch.bool, device=device)
        # the row each row copies: itself when real, the last real row for padding
        self.source = torch.arange(N, dtype=torch.int64, device=device)
        self.used = torch.zeros(L, E + 1, dtype=torch.int16, device=device)  # column E: the padding sink
        # each layer's [E] scratch for a selector (SelectionContext.scratch), zeroed by set_rows before every step
        # that runs one: one fill a step instead of one inside every layer
        self.scratch = torch.zeros(L, E, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._stage = torch.zeros(2 * L * N * K + L * (E + 1), dtype=torch.int16, device=device)
        self._host = torch.zeros(self._stage.numel(), dtype=torch.int16, pin_memory=pin)
        self._host_np = self._host.numpy()
        # per layer li: its distinct experts (columns 0..E), then the next layer's gate-ahead counts (E+1..2E+1)
        self._layer_used = torch.zeros(L, 2 * (E + 1), dtype=torch.int16, pin_memory=pin)
        self._layer_used_np = self._layer_used.numpy()
        self._layer_done = torch.cuda.Event() if pin else None
        self._pin = pin
        self.keep_full = False  # also keep weights and router logits (eager steps only: the trace command)
        self._logits: list[torch.Tensor | None] = [None] * L
        # gate ahead: [L, E + 1] rows whose top-k by the layer's gate on the layer before's MoE input hold each
        # expert (row 0 unused; column E: the padding sink); the top-k itself, and the ones the counts add
        self.ahead_on = False  # set by a model that keeps them: only then does publish_layer copy them too
        self.ahead = torch.zeros(L, E + 1, dtype=torch.int16, device=device)
        self._ahead_ids = torch.zeros(N, K, dtype=torch.int64, device=device)
        self._ahead_kept: list[torch.Tensor | None] = [None] * L  # keep_full: each layer's guesses
        self._ahead_vals = torch.zeros(N, K, dtype=torch.float32, device=device)
        self._ones = torch.ones(N * K, dtype=torch.int16, device=device)

    # -- written by the model, inside the step --------------------------------------------------

    def router_out(self, li: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [T, K] int64, weights [T, K], float32 scratch [T, K]) the router of layer li writes into."""
        return self.ids[li, :T], self.weights[li, :T], self._scratch[:T]

    def keep_logits(self, li: int, logits: torch.Tensor) -> None:
        if self.keep_full:
            self._logits[li] = logits

    def write_selected(self, li: int, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record a selector's rewritten choice for layer li; returns the record's copies (static addresses).

        Padding rows take their source row's choice whatever the selector gave them: they write the same keys
        and values to the same KV-cache row as that row, so they must compute exactly what it computes. A
        selector that wrote its choice into `selected_out(li, T)` itself (padding rows included) is taken as
        it is, with no copy."""
        T = ids.shape[0]
        out_ids, out_w = self.selected_out(li, T)
        if ids.data_ptr() == out_ids.data_ptr() and weights.data_ptr() == out_w.data_ptr():
            return out_ids, out_w
        src = self.source[:T]
        torch.index_select(ids, 0, src, out=self.selected_ids[li, :T])
        torch.index_select(weights, 0, src, out=self.selected_weights[li, :T])
        return self.selected_ids[li, :T], self.selected_weights[li, :T]

    def selected_out(self, li: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The record's [T, K] buffers for layer li's rewritten choice (SelectionContext.out)."""
        return self.selected_ids[li, :T], self.selected_weights[li, :T]

    def keep_ahead(self, li: int, scores: torch.Tensor) -> None:
        """Layer li's experts as guessed before its router (scores [T, E], the next layer's gate on the MoE input
        of layer li - 1): per expert, how many real rows have it in their top-k (graph-capturable)."""
        T = scores.shape[0]
        torch.topk(scores.float(), self.top_k, dim=-1, out=(self._ahead_vals[:T], self._ahead_ids[:T]))
        row = self.ahead[li]
        row.zero_()
        row.index_add_(0, self._used_rows(self._ahead_ids[:T], T).flatten(), self._ones[: T * self.top_k])
        if self.keep_full:
            self._ahead_kept[li] = self._ahead_ids[:T].clone()

    def _used_rows(self, ids: torch.Tensor, T: int) -> torch.Tensor:
        """ids [..., T, K] with the picks of padding rows sent to the sink column E."""
        return torch.where(self.real[:T, None], ids, self.num_experts)

    def publish_layer(self, li: int, ids: torch.Tensor) -> None:
        """Start copying layer li's distinct experts (over the real rows of `ids` [T, K]) to the host
        (graph-capturable); then `layer_published()` on the host, outside any capture, and `layer_experts(li)`."""
        T = ids.shape[0]
        used = self.used[li]
        used.zero_()
        used.scatter_(0, self._used_rows(ids, T).flatten(), 1)
        E = self.num_experts
        self._layer_used[li, : E + 1].copy_(used, non_blocking=True)
        if self.ahead_on and li + 1 < self.num_layers:  # what the gate ahead guessed for the next layer
            self._layer_used[li, E + 1 :].copy_(self.ahead[li + 1], non_blocking=True)

    def layer_published(self) -> None:
        """Mark (on the current stream) the point after the latest `publish_layer`; an event recorded inside a
        graph capture would not fire when the graph replays, so this runs after the replay."""
        if self._layer_done is not None:
            self._layer_done.record()

    def layer_experts(self, li: int) -> list[int]:
        """The distinct experts `publish_layer` found for layer li, once its copy has landed (waits for it alone)."""
        if self._layer_done is not None:
            self._layer_done.synchronize()
        return np.flatnonzero(self._layer_used_np[li, : self.num_experts]).tolist()

    def layer_ahead(self, li: int, published: bool) -> np.ndarray:
        """[E] how many of the step's rows the gate ahead gave each expert of layer li + 1: from the copy
        `publish_layer(li)` made (`published`: read after `layer_experts(li)`), else straight from the device
        (an eager step: a synchronisation of its own)."""
        E = self.num_experts
        if published:
            return self._layer_used_np[li, E + 1 : 2 * E + 1].astype(np.int64)
        return self.ahead[li + 1, :E].cpu().numpy().astype(np.int64)

    # -- the end of the step ----------------------------------------------------------------------

    def _packed(self, T: int, selected: bool) -> tuple[int, int]:
        """Where `stage(T, selected)` packs: the ids that ran from 0, the router's own from n (when selected),
        each layer's distinct experts from m, to the end m + L * (E + 1). Returns (n, m)."""
        n = self.num_layers * T * self.top_k
        return n, 2 * n if selected else n

    def stage(self, T: int, selected: bool) -> None:
        """Pack the step's routes for the host and start their copy (on the current stream; graph-capturable)."""
        L, K, E = self.num_layers, self.top_k, self.num_experts
        ids = self.selected_ids if selected else self.ids
        self.used.zero_()
        self.used.scatter_(1, self._used_rows(ids[:, :T], T).reshape(L, T * K), 1)
        n, m = self._packed(T, selected)
        self._stage[:n].view(L, T, K).copy_(ids[:, :T])
        if selected:
            self._stage[n:m].view(L, T, K).copy_(self.ids[:, :T])
        end = m + L * (E + 1)
        self._stage[m:end].view(L, E + 1).copy_(self.used)
        self._host[:end].copy_(self._stage[:end], non_blocking=True)

    def snapshot(self, T: int, selected: bool) -> torch.Tensor:
        """Start a copy of what `stage(T, selected)` packed into a host buffer of its own (pinned on CUDA), on the
        current stream, and return it: a step whose routes are read after the next step is launched reads them
        from here, since that step's `stage` copies over the record's own host buffer. Read it with
        `read(..., host=)` once the stream has passed this point."""
        end = self._packed(T, selected)[1] + self.num_layers * (self.num_experts + 1)
        host = torch.empty(end, dtype=torch.int16, pin_memory=self._pin)
        host.copy_(self._stage[:end], non_blocking=True)
        return host

    def read(self, T: int, selected: bool, rows: list[slice], real: int | None = None,
             host: torch.Tensor | None = None) -> StepRoutes:
        """The routes `stage(T, selected)` copied, for the first `real` rows (default all T; a CUDA graph stages
        its whole padded bucket); call after the stream that staged them has been synchronised. `host`: read
        them from a `snapshot` instead (its arrays are then the step's own, not views the next step overwrites)."""
        L, K, E = self.num_layers, self.top_k, self.num_experts
        if self.keep_full and host is not None:
            raise RuntimeError("keep_full reads a step's weights and logits from the device: a step read from a "
                               "snapshot, after the next was launched, would get the next one's (settle each step)")
        real = T if real is None else real
        n, m = self._packed(T, selected)
        h = self._host_np if host is None else host.numpy()
        ids = h[:n].reshape(L, T, K)[:, :real]
        router_ids = h[n:m].reshape(L, T, K)[:, :real] if selected else ids
        used = h[m : m + L * (E + 1)].reshape(L, E + 1)[:, :E] > 0
        weights = logits = ahead = None
        if self.keep_full:
            src = self.selected_weights if selected else self.weights
            weights = src[:, :real].float().cpu().numpy()
            logits = np.stack([l[:real].float().cpu().numpy() for l in self._logits])
            if self.ahead_on:
                ahead = np.full((L, real, K), -1, dtype=np.int64)
                for li in range(1, L):
                    ahead[li] = self._ahead_kept[li][:real].cpu().numpy()
        return StepRoutes(ids, router_ids, used, rows, weights, logits, ahead)

    # -- row masks ----------------------------------------------------------------------------------

    def set_rows(self, real: int, padded: int, exact: list[bool] | None) -> None:
        """Rows 0..real-1 are real tokens, real..padded-1 padding; `exact` per real row (None: all exact)."""
        # fresh host buffers each step (pinned on CUDA, from the caching allocator, which keeps a block until its
        # copy is done): a step scheduled ahead (EngineConfig.async_scheduling) writes its rows while the step
        # before may not have read its own yet
        masks = torch.zeros(2, padded, dtype=torch.bool, pin_memory=self._pin)
        masks[0, :real] = True
        masks[1] = True
        if exact is not None:
            masks[1, :real] = torch.tensor(exact, dtype=torch.bool)
        source = torch.empty(padded, dtype=torch.int64, pin_memory=self._pin)
        source[:real] = torch.arange(real)
        source[real:] = real - 1
        self.source[:padded].copy_(source, non_blocking=True)
        self.real[:padded].copy_(masks[0], non_blocking=True)
        self.exact[:padded].copy_(masks[1], non_blocking=True)
        if exact is not None:  # a step that runs a selector
            self.scratch.zero_()
