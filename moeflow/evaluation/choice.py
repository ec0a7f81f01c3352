"""A multiple-choice task from the corpus: pick a passage's true continuation among four.

Item: a document's first `passage_tokens` tokens (BOS included); its true next `continuation_tokens`
tokens, and three distractors, the continuations at the same place of three other documents (of the
passage's own domain where it has enough, so language alone does not give the answer away), drawn by a
seeded generator; the answer's position is drawn too. Each choice is scored by the log-likelihood of its
tokens after the passage, teacher-forced through the engine: the passage's last token is forced before
the choice, so every choice token is predicted by a decode step and approximate routing applies to all of
them. The highest score is the model's pick (ties: the first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from moeflow.data.corpus import Document
from moeflow.errors import ConfigError
from moeflow.engine.stats import GenerateStats
from moeflow.evaluation.forcing import Forced, check_routings, teacher_force

NUM_CHOICES = 4


@dataclass(frozen=True)
class ChoiceItem:
    key: str
    domain: str
    passage: list[int]
    choices: tuple[tuple[int, ...], ...]
    answer: int  # index of the true continuation in `choices`


@dataclass
class ChoiceRun:
    routing: str
    accuracy: float
    items: int
    same_pick_as_exact: float  # share of items where this mode picks what exact routing picks
    picks: list[int]
    stats: GenerateStats

    def as_dict(self) -> dict:
        s = self.stats
        return {"routing": self.routing, "accuracy": self.accuracy, "items": self.items,
                "same_pick_as_exact": self.same_pick_as_exact,
                "distinct_experts_per_layer_step": s.distinct_experts_per_layer_step,
                "remapped_share": s.remapped_share, "decode_steps": s.decode_steps}


def build_items(tokenizer, docs: Iterable[Document], passage_tokens: int = 32, continuation_tokens: int = 16,
                num_items: int | None = None, seed: int = 0) -> list[ChoiceItem]:
    """Items from the documents long enough (passage + continuation), in the order given; distractors come
    from every long-enough document, the items' own included."""
    if passage_tokens < 2 or continuation_tokens < 1:
        raise ConfigError("a passage needs at least 2 tokens and a continuation at least 1")
    if num_items is not None and num_items < 1:
        raise ConfigError(f"at least one item is needed, got {num_items}")
    n, m = passage_tokens, continuation_tokens
    long_enough = []
    for doc in docs:
        ids = tokenizer.encode(doc.text)
        if len(ids) >= n + m:
            long_enough.append((doc, ids[:n], tuple(ids[n : n + m])))
    if len(long_enough) < NUM_CHOICES:
        raise ConfigError(f"only {len(long_enough)} documents hold {n + m} tokens; {NUM_CHOICES} are needed")
    by_domain: dict[str, list[int]] = {}
    for i, (doc, _, _) in enumerate(long_enough):
        by_domain.setdefault(doc.domain, []).append(i)
    rng = np.random.default_rng(seed)
    items = []
    for i, (doc, passage, truth) in enumerate(long_enough[:num_items]):
        pool = [j for j in by_domain[doc.domain] if long_enough[j][2] != truth]
        if len(pool) < NUM_CHOICES - 1:
            pool = [j for j in range(len(long_enough)) if long_enough[j][2] != truth]
        if len(pool) < NUM_CHOICES - 1:
            raise ConfigError(f"{doc.doc_id}: fewer than {NUM_CHOICES - 1} other continuations to draw from")
        distractors = [long_enough[j][2] for j in rng.choice(pool, NUM_CHOICES - 1, replace=False)]
        answer = int(rng.integers(NUM_CHOICES))
        choices = distractors[:answer] + [truth] + distractors[answer:]
        items.append(ChoiceItem(f"{i}:{doc.doc_id}", doc.domain, passage, tuple(choices), answer))
    return items


def item_sequences(items: list[ChoiceItem]) -> list[Forced]:
    return [Forced(f"{item.key}#{c}", item.passage[:-1], [item.passage[-1], *choice])
            for item in items for c, choice in enumerate(item.choices)]


def evaluate_choice(engine, items: list[ChoiceItem], routings: Iterable[str] = ("exact",),
                    show_progress: bool = False, seed: int = 0) -> dict[str, ChoiceRun]:
    """Accuracy per routing mode over the same items; exact runs first (and always: it is the reference).
    The choices run in a seeded shuffled order, so that a decode batch mixes items as a server's would,
    rather than holding an item's four copies of one passage side by side."""
    modes = check_routings(routings)
    modes = ["exact"] + [m for m in modes if m != "exact"]
    seqs = item_sequences(items)
    seqs = [seqs[i] for i in np.random.default_rng(seed).permutation(len(seqs))]
    total = sum(len(s.forced) - 1 for s in seqs)
    runs: dict[str, ChoiceRun] = {}
    for mode in modes:
        with tqdm(total=total, desc=f"choice ({mode})", unit="tok", disable=not show_progress) as bar:
            scored, stats = teacher_force(engine, seqs, mode, bar.update)
        picks = []
        for item in items:
            scores = [math.fsum(scored[f"{item.key}#{c}"].logprobs) for c in range(len(item.choices))]
            picks.append(max(range(len(scores)), key=lambda c: (scores[c], -c)))
        right = sum(p == item.answer for p, item in zip(picks, items))
        base = runs["exact"].picks if "exact" in runs else picks
        same = sum(a == b for a, b in zip(picks, base))
        runs[mode] = ChoiceRun(mode, right / len(items), len(items), same / len(items), picks, stats)
    return runs
