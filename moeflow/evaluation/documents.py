"""The documents an evaluation reads: .jsonl files, a corpus split, or a folder of .jsonl files (such as a
corpus's heldout/ or tests/data/heldout), the domains taken in turn."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from moeflow.data.corpus import SPLITS, Document, iter_jsonl
from moeflow.errors import ConfigError


def load_documents(paths: Sequence[str | Path], split: str = "test", domains: Iterable[str] | None = None,
                   max_docs: int | None = None) -> list[Document]:
    """Documents from each path (a .jsonl file of documents; a corpus directory: its `split`; any other
    directory: every .jsonl file in it), dealt out one domain at a time in turn (the first document of each
    domain, then the second of each, ...), so that any prefix of the list mixes the domains; at most
    `max_docs` of them."""
    if not paths:
        raise ConfigError("no data given: pass a .jsonl file of documents or a corpus directory")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    wanted = None if domains is None else list(domains)
    by_domain: dict[str, list[Document]] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"data {p} does not exist")
        if p.is_file():
            files = [p]
        elif (p / f"{split}.jsonl").is_file():
            files = [p / f"{split}.jsonl"]
        else:
            files = sorted(p.glob("*.jsonl"))
            if not files:
                raise ConfigError(f"{p} holds neither {split}.jsonl (a corpus split) nor any .jsonl file")
        for f in files:
            for doc in iter_jsonl(f, wanted):
                by_domain.setdefault(doc.domain, []).append(doc)
    if not by_domain:
        raise ConfigError(f"no documents in {', '.join(map(str, paths))}"
                          + (f" for domains {', '.join(wanted)}" if wanted else ""))
    out: list[Document] = []
    queues = [by_domain[d] for d in sorted(by_domain)]
    for i in range(max(map(len, queues))):
        out.extend(q[i] for q in queues if i < len(q))
    return out if max_docs is None else out[:max_docs]
