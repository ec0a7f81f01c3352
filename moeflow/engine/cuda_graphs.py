"""CUDA graphs of decode steps, captured once at start-up.

A decode step launches a few hundred small kernels; replaying them as graphs removes the
launch gaps that dominate at small batch sizes. Graphs are keyed by batch bucket alone:
attention reads each sequence's context length from a device tensor (models/decode_attention.py),
so no context length ever needs a graph of its own, and every graph a server will replay is
captured before it serves its first request (`capture_all`), into one shared memory pool.

Inputs live in static buffers sized for the largest bucket. A batch smaller than its bucket
is padded by repeating its last sequence: the copy computes exactly what the original does
(and writes the same keys and values to the same cache row), so the padding changes neither
any output nor which experts a step needs. Selectors keep that true by depending on the batch
only through its real rows (routing/selection.py), and the RouteRecord counts real rows only.

Each bucket has a graph per routing variant: exact (the router's choice runs) and, where the
engine has one, an approximate selector's; a step whose rows all asked for exact routing replays
the exact graph and pays nothing for the selector.

- ResidentDecodeGraphs: every expert is resident, so a whole step is one graph.
- OffloadedDecodeGraphs: a step must stop at every router so the host can load the experts
  the router chose. Each stretch between two routers is one graph; the experts of a layer are
  one more graph, replayed at once against the resident experts (while the host reads the
  router's choice) and again after any loads the choice required.
"""

from __future__ import annotations

import gc

import torch

from moeflow.engine.capture import GraphCapturer
from moeflow.engine.kv_cache import KVCache
from moeflow.experts.compute import CachedExperts
from moeflow.experts.kernels import combine_rows, fused_moe_rows
from moeflow.models.model import ForwardBatch, MoEModel
from moeflow.routing.selection import Selector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 256


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    return tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)


def context_buckets(max_len: int) -> tuple[int, ...]:
    """The context lengths eager decode attention on the CPU is padded to: 256, 512, ... and max_len, so
    attention sees a few shapes, not one per step."""
    return tuple(sorted({min(max_len, MIN_CONTEXT_BUCKET << i) for i in range(16)}))


class _DecodeInputs:
    """Static input buffers, and the padded copy of one step's inputs into them."""

    def __init__(self, model: MoEModel, device: torch.device, max_batch: int, max_len: int):
        self.record = model.record
        self.batch_buckets = batch_buckets(max_batch)
        self.max_len = max_len
        n = self.batch_buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.kv_rows = torch.zeros(n, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int64, device=device)

    def load(self, last_tokens: torch.Tensor, positions: list[int], rows: list[int], exact: list[bool] | None) -> int:
        """Copy a step's inputs in, padded; returns its batch bucket. Each row's input token is its KV row's
        entry of `last_tokens` (a device tensor: ModelRunner.last_tokens), gathered on the device. `exact`: per
        row, whether it must stay exact (None: all of them)."""
        b = bucket(len(rows), self.batch_buckets)
        pad = b - len(rows)
        host = torch.tensor([positions + positions[-1:] * pad, rows + rows[-1:] * pad], dtype=torch.int64,
                            pin_memory=True)
        self.positions[:b].copy_(host[0], non_blocking=True)
        self.kv_rows[:b].copy_(host[1], non_blocking=True)
        torch.index_select(last_tokens, 0, self.kv_rows[:b], out=self.input_ids[:b])
        torch.add(self.positions[:b], 1, out=self.context_lens[:b])
        self.record.set_rows(len(rows), b, exact)
        return b

    def batch(self, b: int, selector: Selector | None, slot_table: torch.Tensor | None) -> ForwardBatch:
        return ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:b], is_prefill=False,
                            kv_rows=[], starts=[], lengths=[1] * b, kv_rows_t=self.kv_rows[:b],
                            context_lens_t=self.context_lens[:b], max_context=self.max_len, selector=selector,
                            slot_table=slot_table)


class _DecodeGraphs:
    """What both kinds share: inputs, the capturer, the routing variants."""

    def __init__(self, model: MoEModel, kv: KVCache, device: torch.device, max_batch: int, max_len: int,
                 selector: Selector | None):
        self.model, self.kv, self.device = model, kv, device
        self.inputs = _DecodeInputs(model, device, max_batch, max_len)
        self.capturer = GraphCapturer(device)
        self.selector = selector
        self.variants: tuple[Selector | None, ...] = (None,) if selector is None else (None, selector)
        self.logits = torch.empty(self.inputs.batch_buckets[-1], model.spec.vocab_size, dtype=torch.float32,
                                  device=device)
        self.staged_rows = 0  # rows the last step staged in the RouteRecord: its padded bucket
        self.input_ids_zero = torch.zeros(1, dtype=torch.int64, device=device)  # capture's inputs: token 0, row 0

    @property
    def captures(self) -> int:
        """Graphs captured since this object was made (all at start-up, when serving as designed)."""
        return self.capturer.captures

    def capture_all(self) -> None:
        """Capture every bucket's graphs now, largest first (smaller ones reuse the pool's memory)."""
        for b in reversed(self.inputs.batch_buckets):
            for variant in self.variants:
                self.inputs.load(self.input_ids_zero, [0] * b, [0] * b, None)
                self._capture(b, variant)
        torch.cuda.synchronize(self.device)

    def _capture(self, b: int, selector: Selector | None) -> None:
        raise NotImplementedError


class ResidentDecodeGraphs(_DecodeGraphs):
    def __init__(self, model: MoEModel, kv: KVCache, device: torch.device, max_batch: int, max_len: int,
                 selector: Selector | None = None):
        super().__init__(model, kv, device, max_batch, max_len, selector)
        self._graphs: dict[tuple[int, Selector | None], torch.cuda.CUDAGraph] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _capture(self, b: int, selector: Selector | None) -> None:
        fb = self.inputs.batch(b, selector, None)

        def step() -> None:
            self.logits[:b].copy_(self.model.logits(self.model.forward(fb, (self.kv.k, self.kv.v))))
            self.model.record.stage(b, selected=selector is not None)

        self._graphs[b, selector] = self.capturer.run_and_capture(step)

    def run(self, last_tokens: torch.Tensor, positions: list[int], rows: list[int],
            exact: list[bool] | None) -> torch.Tensor:
        """Logits [B, V] of one decode step for B sequences (their KV rows `rows`, each one's input token read
        from `last_tokens` on the device); the step's routes are staged in the record. `exact` None: every row
        exact (the exact graph runs); else per row, and the selector's graph runs."""
        b = self.staged_rows = self.inputs.load(last_tokens, positions, rows, exact)
        self._graphs[b, None if exact is None else self.selector].replay()
        return self.logits[: len(rows)]


class OffloadedDecodeGraphs(_DecodeGraphs):
    def __init__(self, model: MoEModel, kv: KVCache, experts: CachedExperts, device: torch.device, max_batch: int,
                 max_len: int, selector: Selector | None = None):
        super().__init__(model, kv, device, max_batch, max_len, selector)
        spec = model.spec
        self.experts = experts
        n, H, K = self.inputs.batch_buckets[-1], spec.hidden_size, spec.router.top_k
        dtype = model.dtype
        self.h = torch.empty(n, H, dtype=dtype, device=device)  # residual stream between pieces
        self.r = torch.empty(n, H, dtype=dtype, device=device)  # the MoE block's input
        self.rows = torch.empty(n, K, H, dtype=torch.float32, device=device)
        self._pieces: dict[tuple[int, Selector | None], list[torch.cuda.CUDAGraph]] = {}
        # (batch bucket, MoE layer ordinal, selected?) -> the layer's experts, reading the record's routes
        self._expert_graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}

    @property
    def num_graphs(self) -> int:
        return sum(map(len, self._pieces.values())) + len(self._expert_graphs)

    def _capture(self, b: int, selector: Selector | None) -> None:
        fb = self.inputs.batch(b, selector, self.experts.cache.slot_table)
        L = len(self.model.spec.moe_layers)
        pieces = []
        for k in range(L + 1):
            pieces.append(self.capturer.run_and_capture(lambda k=k: self._piece(k, b, fb, selector is not None)))
            if k < L:
                key = (b, k, selector is not None)
                if key not in self._expert_graphs:
                    self._expert_graphs[key] = self.capturer.run_and_capture(
                        lambda k=k: self._experts_body(b, k, selector is not None))
        self._pieces[b, selector] = pieces

    def run(self, last_tokens: torch.Tensor, positions: list[int], rows: list[int],
            exact: list[bool] | None) -> torch.Tensor:
        """Logits [B, V] of one decode step for B sequences (see ResidentDecodeGraphs.run)."""
        b = self.staged_rows = self.inputs.load(last_tokens, positions, rows, exact)
        selected = exact is not None
        pieces = self._pieces[b, self.selector if selected else None]
        moe_layers = self.model.spec.moe_layers
        cache, record = self.experts.cache, self.model.record
        self.experts.forget_pending()
        for k, piece in enumerate(pieces):
            piece.replay()
            # the layer before is heard now, while the device runs the stretch just replayed
            self.experts.hear_pending()
            if k == len(moe_layers):
                break
            record.layer_published()
            # Enqueue the experts against the slot table as it stands before learning what the
            # router chose: when they are all resident (most layers at small batches) that is the
            # layer's whole work, and the GPU computes while the host checks.
            cache.prepare_compute(moe_layers[k])
            experts = self._expert_graphs[b, k, selected]
            experts.replay()
            needed = record.layer_experts(k)  # waits for this router's choice, not for the whole device
            self.experts.run_rounds(moe_layers[k], needed, experts.replay, speculated=True)
        return self.logits[: len(rows)]

    def _piece(self, k: int, b: int, fb: ForwardBatch, selected: bool) -> None:
        """From MoE layer k-1's expert output (embedding for k = 0) to MoE layer k's router (logits and the
        staged routes at the end)."""
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
            model.record.stage(b, selected)
            return
        h = model.dense_layers(done, moe_layers[k], h, fb, kv)
        h, r, routing = model.attention_and_route(moe_layers[k], h, fb, kv)
        self.h[:b].copy_(h)
        self.r[:b].copy_(r)
        model.record.publish_layer(k, routing.ids)

    def _experts_body(self, b: int, k: int, selected: bool) -> None:
        """One round of MoE layer k's experts, reading the device slot table as the cache left it."""
        cache, record = self.experts.cache, self.model.record
        ids = (record.selected_ids if selected else record.ids)[k, :b]
        weights = (record.selected_weights if selected else record.weights)[k, :b]
        fused_moe_rows(self.r[:b], cache.slot_table[k][ids], weights, cache.w_gate_up, cache.w_down, self.rows[:b],
                       backend=self.experts.backend)


def capture_decode_graphs(model: MoEModel, kv: KVCache, experts: CachedExperts, resident: bool,
                          device: torch.device, max_batch: int, max_len: int,
                          selector: Selector | None) -> tuple[_DecodeGraphs, int]:
    """Every decode graph for the cache's mode (resident or offloaded), captured now; and the device memory the
    capture kept (the graphs' pool and static buffers). The caller drops the graphs these replace first, so that
    the figure does not net their memory out."""
    cls = ResidentDecodeGraphs if resident else OffloadedDecodeGraphs
    graphs = cls(model, kv, *(() if resident else (experts,)), device, max_batch, max_len, selector=selector)
    listener, experts.route_listener = experts.route_listener, None  # no host hook fires during capture
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    try:
        graphs.capture_all()
    finally:
        experts.route_listener = listener
    return graphs, torch.cuda.memory_reserved(device) - before
