"""Perplexity in decode mode: documents teacher-forced one token per step, in real decode batches.

Each document is cut to `max_tokens_per_doc` tokens of its encoding (BOS included, where the tokenizer
adds one). Its first token is the prompt; every later token is forced, and every token from the third on
is scored (the second is predicted by the prefill, which approximate routing never touches; see
forcing.py). An approximate mode is always measured beside exact routing on the same documents, in the
same batches: agreement_top1 is the share of scored positions where both runs' top-1 tokens are equal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from tqdm import tqdm

from moeflow.data.corpus import Document
from moeflow.engine.stats import GenerateStats
from moeflow.evaluation.forcing import Forced, agreement, check_routings, mean_nll, teacher_force

MIN_DOC_TOKENS = 3  # a prompt token, one forced but unscored, one scored


@dataclass
class PerplexityRun:
    routing: str
    perplexity: float
    mean_nll: float
    tokens: int  # scored positions
    documents: int
    agreement_top1: float  # with exact routing's top-1 (1.0 for exact itself)
    stats: GenerateStats

    def as_dict(self) -> dict:
        s = self.stats
        return {"routing": self.routing, "perplexity": self.perplexity, "mean_nll": self.mean_nll,
                "agreement_top1": self.agreement_top1,
                "distinct_experts_per_layer_step": s.distinct_experts_per_layer_step,
                "remapped_share": s.remapped_share, "tokens": self.tokens, "documents": self.documents,
                "decode_steps": s.decode_steps, "hit_rate": s.hit_rate, "bytes_moved": s.cache.bytes_moved,
                "decode_s": s.decode_s}


def document_sequences(tokenizer, docs: Iterable[Document], max_tokens_per_doc: int) -> list[Forced]:
    """One Forced per document long enough to score (at least MIN_DOC_TOKENS tokens once cut)."""
    out = []
    for doc in docs:
        ids = tokenizer.encode(doc.text)[:max_tokens_per_doc]
        if len(ids) >= MIN_DOC_TOKENS:
            out.append(Forced(doc.doc_id, ids[:1], ids[1:]))
    return out


def evaluate_perplexity(engine, sequences: list[Forced], routings: Iterable[str] = ("exact",),
                        show_progress: bool = False) -> dict[str, PerplexityRun]:
    """A run per routing mode over the same sequences, exact first (every mode's agreement is against it;
    it runs even when not asked for). The engine must offer each approximate mode (set_selector)."""
    modes = check_routings(routings)
    modes = ["exact"] + [m for m in modes if m != "exact"]
    keys = [s.key for s in sequences]
    if len(set(keys)) != len(keys):
        raise ValueError("sequence keys must be unique")
    total = sum(len(s.forced) - 1 for s in sequences)
    runs: dict[str, PerplexityRun] = {}
    exact_scores = None
    for mode in modes:
        with tqdm(total=total, desc=f"perplexity ({mode})", unit="tok", disable=not show_progress) as bar:
            scored, stats = teacher_force(engine, sequences, mode, bar.update)
        nll, n = mean_nll(scored.values())
        if exact_scores is None:
            exact_scores = scored
        runs[mode] = PerplexityRun(mode, math.exp(nll), nll, n, len(scored), agreement(scored, exact_scores), stats)
    return runs
