"""ModelRunner: turns a scheduled batch into device tensors, runs the model, returns logits.

Shapes: T tokens in the step, B sequences, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.engine.cuda_graphs import OffloadedDecodeGraphs, ResidentDecodeGraphs, bucket, context_buckets
from moeflow.engine.kv_cache import KVCache
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.engine.sequence import Sequence
from moeflow.models.model import ForwardBatch, MoEModel


@dataclass
class StepLogits:
    last: torch.Tensor  # [B, V] float32: the logits that choose each sequence's next token
    prompt: dict[int, torch.Tensor]  # batch index -> [n, V] for sequences that asked for prompt logprobs


class ModelRunner:
    def __init__(self, model: MoEModel, kv: KVCache, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        self.graphs: ResidentDecodeGraphs | OffloadedDecodeGraphs | None = None  # set by the engine
        self.context_buckets = context_buckets(kv.max_len)

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
        )

    def prepare_decode(self, seqs: list[Sequence]) -> ForwardBatch:
        context = [s.num_tokens for s in seqs]
        return ForwardBatch(
            input_ids=self._tensor([s.last_token for s in seqs]),
            positions=self._tensor([c - 1 for c in context]), is_prefill=False,
            kv_rows=[s.kv_row for s in seqs], starts=[c - 1 for c in context], lengths=[1] * len(seqs),
            kv_rows_t=self._tensor([s.kv_row for s in seqs]), context_lens_t=self._tensor(context),
            max_context=bucket(max(context), self.context_buckets),
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepLogits:
        if self.graphs is not None and not batch.is_prefill:
            seqs = batch.seqs
            logits = self.graphs.run([s.last_token for s in seqs], [s.num_tokens - 1 for s in seqs],
                                     [s.kv_row for s in seqs])
            return StepLogits(logits, {})
        fb = self.prepare_prefill(batch.seqs) if batch.is_prefill else self.prepare_decode(batch.seqs)
        hidden = self.model.forward(fb, (self.kv.k, self.kv.v))
        ends = torch.tensor(fb.lengths).cumsum(0) - 1
        last = self.model.logits(hidden[ends.to(self.device)])
        prompt: dict[int, torch.Tensor] = {}
        if batch.is_prefill:
            offset = 0
            for i, (s, n) in enumerate(zip(batch.seqs, fb.lengths)):
                if s.params.prompt_logprobs is not None:
                    prompt[i] = self.model.logits(hidden[offset : offset + n])
                offset += n
        return StepLogits(last, prompt)
