"""The corpus on disk: documents, their split, and the one reader every consumer shares.

Layout of a corpus directory (the trainer, `moeflow trace` and the tests rely on it):

    train.jsonl, validation.jsonl, test.jsonl   one Document per line, sorted by doc_id
    heldout/{domain}.jsonl                      a small prefix of the test split, for CI
    SOURCES.md, summary.json, summary.md        provenance and counts

A document's split is a function of its doc_id alone (a SHA-256 bucket), so it does not
depend on file-system order, on Python's hash seed, or on which other documents exist:
adding a source never moves a document from train to test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from moeflow.errors import MoeflowError

DOMAINS: tuple[str, ...] = ("wiki_en", "wiki_fr", "wiki_es", "shakespeare", "python_docs", "fortunes")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Percent of documents per split, in SPLITS order.
SPLIT_PERCENT: tuple[int, ...] = (90, 5, 5)
HELDOUT_DIR = "heldout"


class CorpusError(MoeflowError):
    """A corpus directory that is missing a split, or holds a malformed line."""


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str  # "{domain}/{stable id inside the source}", unique across the corpus
    domain: str
    source: str  # "{package} {version}/{path inside the package}"
    text: str


def _bucket(doc_id: str, salt: str) -> int:
    digest = hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def split_of(doc_id: str) -> str:
    """The split a document belongs to: stable across machines, runs and corpus versions."""
    bucket = _bucket(doc_id, "split")
    upper = 0
    for split, percent in zip(SPLITS, SPLIT_PERCENT):
        upper += percent
        if bucket < upper:
            return split
    raise AssertionError("SPLIT_PERCENT must add up to 100")


def sample_key(doc_id: str) -> bytes:
    """Order for taking a deterministic subset; salted apart from split_of so that a
    subset keeps the 90/5/5 proportions instead of favouring one split."""
    return hashlib.sha256(f"sample\0{doc_id}".encode()).digest()


def _split_path(corpus_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(corpus_dir) / f"{split}.jsonl"


def iter_jsonl(path: Path, domains: Iterable[str] | None = None) -> Iterator[Document]:
    wanted = None if domains is None else set(domains)
    if not path.is_file():
        raise CorpusError(f"{path} not found; build the corpus with `moeflow data build DIR`")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                doc = Document(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise CorpusError(f"{path}:{lineno}: not a corpus document ({exc})") from exc
            if wanted is None or doc.domain in wanted:
                yield doc


def iter_split(corpus_dir: str | Path, split: str, domains: Iterable[str] | None = None) -> Iterator[Document]:
    """Stream one split's documents in file order (sorted by doc_id), optionally one domain set."""
    return iter_jsonl(_split_path(Path(corpus_dir), split), domains)


def read_split(corpus_dir: str | Path, split: str, domains: Iterable[str] | None = None) -> list[Document]:
    return list(iter_split(corpus_dir, split, domains))


def write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    """One JSON object per line, keys in field order, UTF-8 kept as is: byte-stable output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")


def write_splits(corpus_dir: Path, docs: Iterable[Document]) -> dict[str, list[Document]]:
    """Assign each document its split and write the three split files; returns them."""
    by_split: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in docs:
        by_split[split_of(doc.doc_id)].append(doc)
    for split, split_docs in by_split.items():
        split_docs.sort(key=lambda d: d.doc_id)
        write_jsonl(_split_path(corpus_dir, split), split_docs)
    return by_split


def heldout_sample(test_docs: Iterable[Document], domain: str, max_chars: int) -> list[Document]:
    """The first test documents of a domain, by doc_id, while their text fits in max_chars
    (at least one document, so a domain is never missing from the sample)."""
    picked: list[Document] = []
    total = 0
    for doc in sorted((d for d in test_docs if d.domain == domain), key=lambda d: d.doc_id):
        if picked and total + len(doc.text) > max_chars:
            break
        picked.append(doc)
        total += len(doc.text)
    return picked


def write_heldout(corpus_dir: str | Path, out_dir: str | Path | None = None, max_chars: int = 40_000) -> dict[str, int]:
    """Write `{out_dir}/{domain}.jsonl` (default `corpus_dir/heldout`) from the test split,
    for measuring held-out perplexity without the full corpus. Returns documents per domain."""
    out = Path(out_dir) if out_dir is not None else Path(corpus_dir) / HELDOUT_DIR
    test_docs = read_split(corpus_dir, "test")
    counts = {}
    for domain in DOMAINS:
        sample = heldout_sample(test_docs, domain, max_chars)
        if sample:
            write_jsonl(out / f"{domain}.jsonl", sample)
        counts[domain] = len(sample)
    return counts
