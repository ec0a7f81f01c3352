"""`moeflow data build`: unpacked sources in, a split, summarised corpus directory out.

Everything after the download runs on a directory of unpacked sources, so tests (and
offline machines holding a copy) build from `--sources DIR` without touching the network.
The output depends only on the source files: two builds are byte-identical.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moeflow.data.corpus import DOMAINS, HELDOUT_DIR, CorpusError, Document, sample_key, write_heldout, write_splits
from moeflow.data.extract import EXTRACTORS
from moeflow.data.sources import sources_markdown
from moeflow.data.summary import summarise, write_summary
from moeflow.data.text import MIN_DOC_CHARS


def collect(sources_root: Path,
            max_docs_per_domain: int | None = None) -> tuple[list[Document], dict[str, dict[str, int]]]:
    """Every kept document, and per domain how many were dropped and why.

    Exact duplicates within a domain (the same fortune in two cookie files) keep only the
    smallest doc_id, so one text cannot sit in both train and test. A per-domain cap takes
    a hash-ordered sample, which keeps each split's share.
    """
    from tqdm import tqdm

    docs: list[Document] = []
    dropped: dict[str, dict[str, int]] = {}
    seen_ids: set[str] = set()
    for domain in DOMAINS:
        candidates = []
        short = 0
        for doc in tqdm(EXTRACTORS[domain](sources_root), desc=domain, unit="doc"):
            if doc.doc_id in seen_ids:
                raise CorpusError(f"two documents have the id {doc.doc_id!r}; extractor ids must be unique")
            seen_ids.add(doc.doc_id)
            if len(doc.text) < MIN_DOC_CHARS:
                short += 1
            else:
                candidates.append(doc)
        unique: dict[str, Document] = {}
        for doc in sorted(candidates, key=lambda d: d.doc_id):
            unique.setdefault(doc.text, doc)
        kept = list(unique.values())
        capped = 0
        if max_docs_per_domain is not None and len(kept) > max_docs_per_domain:
            capped = len(kept) - max_docs_per_domain
            kept = sorted(kept, key=lambda d: sample_key(d.doc_id))[:max_docs_per_domain]
        dropped[domain] = {"short": short, "duplicate": len(candidates) - len(unique), "capped": capped}
        docs += kept
    return docs, dropped


def build_corpus(out_dir: Path, sources_root: Path, *, max_docs_per_domain: int | None = None,
                 tokenizer_dir: Path | None = None, heldout_chars: int = 40_000) -> dict:
    """Write the corpus directory (layout in moeflow/data/corpus.py); returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs, dropped = collect(sources_root, max_docs_per_domain)
    by_split = write_splits(out_dir, docs)
    (out_dir / "SOURCES.md").write_text(sources_markdown(), encoding="utf-8")

    tokenizer = sha256 = None
    if tokenizer_dir is not None:
        from moeflow.data.tokenizer import load_tokenizer, tokenizer_sha256

        tokenizer, _ = load_tokenizer(tokenizer_dir)
        sha256 = tokenizer_sha256(tokenizer_dir)
    summary = summarise(by_split, dropped, tokenizer, sha256)
    write_summary(out_dir, summary)

    # A rebuild replaces the sample whole, so no file of a domain that is gone lingers.
    shutil.rmtree(out_dir / HELDOUT_DIR, ignore_errors=True)
    if heldout_chars > 0:
        write_heldout(out_dir, max_chars=heldout_chars)
    return summary
