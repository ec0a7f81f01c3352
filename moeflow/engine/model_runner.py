"""ModelRunner: turns a scheduled batch into device tensors, runs the model, returns logits.

Shapes: T tokens in the step, B sequences, V vocabulary.

Decode steps replay CUDA graphs where the engine captured them; everything else runs eagerly.
Either way the step's routes end up staged in the model's RouteRecord, for the engine to read
after the step's token sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.engine.cuda_graphs import OffloadedDecodeGraphs, ResidentDecodeGraphs, bucket, context_buckets
from moeflow.engine.kv_cache import KVCache
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.engine.sequence import Sequence
from moeflow.experts.compute import CachedExperts
from moeflow.models.model import ForwardBatch, MoEModel
from moeflow.routing.selection import Selector


@dataclass
class StepLogits:
    last: torch.Tensor  # [B, V] float32: the logits that choose each sequence's next token
    prompt: dict[int, torch.Tensor]  # batch index -> [n, V] for sequences that asked for prompt logprobs
    num_tokens: int  # T: rows of the step in the RouteRecord (a graph's padded bucket included)
    selected: bool  # whether a selector rewrote the routing (the record holds both choices)
    rows: list[slice]  # per sequence, its tokens' rows in the RouteRecord
    kv_rows: torch.Tensor  # [B] each sequence's KV-cache row, on the device (remember_tokens)


class ModelRunner:
    def __init__(self, model: MoEModel, kv: KVCache, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        self.graphs: ResidentDecodeGraphs | OffloadedDecodeGraphs | None = None  # set by the engine
        self.context_buckets = context_buckets(kv.max_len)
        self.slot_table: torch.Tensor | None = None  # the expert cache's device table; None when all resident
        self.graph_step = False  # the step running now replays decode graphs
        # each KV row's latest token, as the sampler left it on the device: a decode step reads its inputs from
        # here, so the host need not know a token before the step that consumes it is launched
        # (EngineConfig.async_scheduling)
        self.last_tokens = torch.zeros(kv.rows, dtype=torch.int64, device=device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def prepare_prefill(self, seqs: list[Sequence]) -> ForwardBatch:
        ids, positions = [], []
        for s in seqs:
            ids.extend(s.prompt_ids)
            positions.extend(range(len(s.prompt_ids)))
        return ForwardBatch(
            input_ids=self._tensor(ids), positions=self._tensor(positions), is_prefill=True,
            kv_rows=[s.kv_row for s in seqs], starts=[0] * len(seqs), lengths=[len(s.prompt_ids) for s in seqs],
            slot_table=self.slot_table,
        )

    def prepare_decode(self, seqs: list[Sequence]) -> ForwardBatch:
        context = [s.context_len for s in seqs]
        kv_rows_t = self._tensor([s.kv_row for s in seqs])
        return ForwardBatch(
            input_ids=self.last_tokens[kv_rows_t],
            positions=self._tensor([c - 1 for c in context]), is_prefill=False,
            kv_rows=[s.kv_row for s in seqs], starts=[c - 1 for c in context], lengths=[1] * len(seqs),
            kv_rows_t=kv_rows_t, context_lens_t=self._tensor(context),
            max_context=bucket(max(context), self.context_buckets), slot_table=self.slot_table,
        )

    def remember_tokens(self, logits: StepLogits, tokens: torch.Tensor) -> None:
        """A step's sampled (or forced) tokens [B], on the device, become its sequences' latest tokens, at their
        KV rows (the next step's inputs are gathered after this on the same stream)."""
        self.last_tokens.index_copy_(0, logits.kv_rows, tokens)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, exact: list[bool] | None = None,
            selector: Selector | None = None) -> StepLogits:
        """`exact`: per sequence, whether its routing must stay exact; None (or no selector): every row is, and
        no selector runs."""
        seqs = batch.seqs
        if selector is None:
            exact = None
        selected = exact is not None
        # a replayed decode step publishes each layer's experts to the host (RouteRecord.publish_layer)
        self.graph_step = self.graphs is not None and not batch.is_prefill
        if self.graph_step:
            logits = self.graphs.run(self.last_tokens, [s.context_len - 1 for s in seqs], [s.kv_row for s in seqs],
                                     exact)
            return StepLogits(logits, {}, self.graphs.staged_rows, selected,
                              [slice(i, i + 1) for i in range(len(seqs))], self.graphs.inputs.kv_rows[: len(seqs)])
        experts = self.model.experts if isinstance(self.model.experts, CachedExperts) else None
        if experts is not None:
            experts.forget_pending()
        fb = self.prepare_prefill(seqs) if batch.is_prefill else self.prepare_decode(seqs)
        T = sum(fb.lengths)
        self.model.record.set_rows(T, T, None if exact is None else
                                   [e for e, n in zip(exact, fb.lengths) for _ in range(n)])
        fb.selector = selector if selected else None
        hidden = self.model.forward(fb, (self.kv.k, self.kv.v))
        self.model.record.stage(T, selected)
        ends = torch.tensor(fb.lengths).cumsum(0)
        last = self.model.logits(hidden[(ends - 1).to(self.device)])
        if experts is not None:
            experts.hear_pending()  # the last MoE layer, while the device computes the logits
        rows = [slice(int(e) - n, int(e)) for e, n in zip(ends, fb.lengths)]
        prompt: dict[int, torch.Tensor] = {}
        if batch.is_prefill:
            for i, (s, r) in enumerate(zip(seqs, rows)):
                if s.params.prompt_logprobs is not None:
                    prompt[i] = self.model.logits(hidden[r])
        kv_rows = fb.kv_rows_t if fb.kv_rows_t is not None else self._tensor(fb.kv_rows)
        return StepLogits(last, prompt, T, selected, rows, kv_rows)
