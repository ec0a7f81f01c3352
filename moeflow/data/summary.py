"""Counts per domain and split: documents, characters and, given a tokenizer, tokens.

summary.json is for programs (the trainer sizes its epochs from it); summary.md is the
same table for people. Neither holds a path or a time, so two builds compare equal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from moeflow.data.corpus import DOMAINS, SPLITS, Document
from moeflow.markdown import table

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_FIELDS = ("documents", "characters", "tokens")


def count_tokens(tokenizer: Tokenizer, docs: list[Document], batch: int = 1024) -> int:
    """Tokens of the texts alone: no bos, so the figure does not depend on document count."""
    total = 0
    for i in range(0, len(docs), batch):
        encodings = tokenizer.encode_batch([d.text for d in docs[i:i + batch]], add_special_tokens=False)
        total += sum(len(e.ids) for e in encodings)
    return total


def summarise(by_split: Mapping[str, list[Document]], dropped: Mapping[str, Mapping[str, int]],
              tokenizer: Tokenizer | None = None, tokenizer_sha256: str | None = None) -> dict:
    from tqdm import tqdm

    counts: dict[str, dict[str, dict[str, int]]] = {}
    cells = [(domain, split) for domain in DOMAINS for split in SPLITS]
    for domain, split in tqdm(cells, desc="summary", unit="cell", disable=tokenizer is None):
        docs = [d for d in by_split[split] if d.domain == domain]
        cell = {"documents": len(docs), "characters": sum(len(d.text) for d in docs)}
        if tokenizer is not None:
            cell["tokens"] = count_tokens(tokenizer, docs)
        counts.setdefault(domain, {})[split] = cell
    totals = {split: {f: sum(counts[d][split][f] for d in DOMAINS)
                      for f in _FIELDS if f in counts[DOMAINS[0]][split]} for split in SPLITS}
    return {
        "splits": list(SPLITS),
        "domains": list(DOMAINS),
        "counts": counts,
        "totals": totals,
        "dropped": {d: dict(dropped.get(d, {})) for d in DOMAINS},
        "tokenizer_sha256": tokenizer_sha256,
    }


def summary_markdown(summary: dict) -> str:
    has_tokens = summary["tokenizer_sha256"] is not None
    fields = _FIELDS if has_tokens else _FIELDS[:2]
    header = ["domain", "split", *fields]
    lines = ["# Corpus summary", ""]
    if has_tokens:
        lines += [f"Tokens counted without special tokens, tokenizer.json sha256 `{summary['tokenizer_sha256']}`.", ""]
    rows = [(domain, split, summary["counts"][domain][split]) for domain in summary["domains"]
            for split in summary["splits"]]
    rows += [("**all**", split, summary["totals"][split]) for split in summary["splits"]]
    lines.append(table(header, [[domain, split, *(f"{cell[f]:,}" for f in fields)] for domain, split, cell in rows]))
    lines += ["", "Dropped before splitting:", ""]
    for domain, dropped in summary["dropped"].items():
        lines.append(f"- {domain}: {dropped.get('short', 0)} too short, {dropped.get('duplicate', 0)} exact "
                     f"duplicates, {dropped.get('capped', 0)} over --max-docs-per-domain")
    return "\n".join(lines) + "\n"


def write_summary(corpus_dir: Path, summary: dict) -> None:
    (corpus_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (corpus_dir / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
