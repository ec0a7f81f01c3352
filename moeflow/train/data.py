"""Training data: corpus documents -> per-domain token streams -> packed fixed-length windows, drawn domain-balanced.

Shapes: D domains, N windows of a domain, T window length (tokens), B windows per batch.

Every document is prefixed with the tokenizer's `<|endoftext|>` token (the corpus convention: it is both bos and
the separator), the documents of a domain are concatenated into one stream, and the stream is cut into
non-overlapping windows of T tokens (the tail shorter than T is dropped). A batch draws each window's domain with
probability proportional to tokens_d ** alpha (alpha < 1 lifts small domains such as fortunes), then the next
window of that domain's shuffled order; a domain is reshuffled when its windows run out. Every draw comes from one
seeded numpy Generator, so a seed fixes the whole data order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeflow.data.corpus import Document
from moeflow.errors import ConfigError

SEPARATOR = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def load_tokenizer(tokenizer_dir: str | Path):
    """(tokenizers.Tokenizer, id of `<|endoftext|>`) from a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"no tokenizer.json in {tokenizer_dir}")
    tokenizer = Tokenizer.from_file(str(path))
    sep = tokenizer.token_to_id(SEPARATOR)
    if sep is None:
        raise ConfigError(f"tokenizer {path} has no {SEPARATOR} token")
    return tokenizer, sep


def token_streams(tokenizer, documents: list[Document], sep_id: int, chunk: int = 512) -> dict[str, np.ndarray]:
    """domain -> int32 stream of its documents' tokens, each document prefixed with `sep_id`; domains sorted."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(documents), chunk):
        batch = documents[start:start + chunk]
        encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encodings):
            ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
            ids[0] = sep_id
            ids[1:] = enc.ids
            parts.setdefault(doc.domain, []).append(ids)
    return {d: np.concatenate(parts[d]) for d in sorted(parts)}


def pack(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """[N, T] non-overlapping windows of a stream, the short tail dropped."""
    n = len(stream) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seq_len].reshape(n, seq_len)


def pack_streams(streams: dict[str, np.ndarray], seq_len: int, max_windows: int | None = None
                 ) -> dict[str, np.ndarray]:
    """pack() per domain, leaving out domains shorter than one window."""
    packed = {d: pack(s, seq_len, max_windows) for d, s in streams.items()}
    return {d: w for d, w in packed.items() if len(w)}


class DomainSampler:
    """Draws [B, T] batches of packed windows, domains weighted by tokens ** alpha; see the module docstring."""

    def __init__(self, windows: dict[str, np.ndarray], alpha: float, seed: int):
        if not windows:
            raise ConfigError("no domain has a full training window; the corpus is too small for this seq_len")
        self.domains = sorted(windows)
        self.windows = windows
        sizes = np.array([windows[d].size for d in self.domains], dtype=np.float64)
        weights = sizes ** alpha
        self.probabilities = weights / weights.sum()
        self.rng = np.random.default_rng(seed)
        self._order = {d: self.rng.permutation(len(windows[d])) for d in self.domains}
        self._next = {d: 0 for d in self.domains}
        self.drawn = {d: 0 for d in self.domains}  # windows drawn per domain, for the training log

    def _take(self, domain: str) -> np.ndarray:
        if self._next[domain] == len(self._order[domain]):
            self._order[domain] = self.rng.permutation(len(self.windows[domain]))
            self._next[domain] = 0
        idx = self._order[domain][self._next[domain]]
        self._next[domain] += 1
        self.drawn[domain] += 1
        return self.windows[domain][idx]

    def next_batch(self, batch_size: int) -> np.ndarray:
        picks = self.rng.choice(len(self.domains), size=batch_size, p=self.probabilities)
        return np.stack([self._take(self.domains[i]) for i in picks])
