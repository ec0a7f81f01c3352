"""What `moeflow bench` feeds a model: the text workload (the yardstick) and the synthetic one.

Text: documents of the corpus test split, the six domains taken in turn, tokenised with
the model's tokenizer and cut to lengths spread over [min_len, max_len]. A document shorter than its length
is continued by the next documents of its domain, joined by a blank line (skipping short documents would
leave out a whole domain: fortunes are a few dozen tokens each). Decoding samples at temperature 0.8 and
top_p 0.95 with a seed per request, 64 output tokens, EOS ignored.

Synthetic: random token ids decoded greedily. A random-weight model falls into a loop of a few tokens
within a few steps, so every step hits the same experts: its routing is degenerate, and its figures are
for kernel speed and for shapes no trained model has, never for caching, prediction or scheduling.

Both are streams: prompt i (its tokens and its seed) depends only on the workload's parameters and i, so
every configuration, budget and batch size that asks for prompt i gets the same request.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moeflow.data.corpus import DOMAINS, Document, iter_jsonl, iter_split
from moeflow.errors import ConfigError
from moeflow.sampling import SamplingParams

_GOLDEN = (math.sqrt(5) - 1) / 2
_MAX_CHARS_PER_TOKEN = 16  # a document is cut to this many characters per wanted token before tokenising
DEGENERATE_NOTE = ("synthetic workload: random token ids decoded greedily. On a random-weight model its routing is "
                   "degenerate: decoding falls into a loop of a few tokens (see distinct output tokens per request), "
                   "so every step hits the same experts. These figures measure kernel speed, not caching, "
                   "prediction or scheduling.")


@dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    params: SamplingParams
    domain: str = ""  # text workload: the domain the prompt was cut from

    def with_routing(self, routing: str) -> Request:
        return self if routing == self.params.routing else replace(self, params=replace(self.params, routing=routing))


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request `index` of a workload seeded `seed` (distinct per request, never 0)."""
    return (seed * 1_000_003 + index + 1) % (2**63 - 1)


def prompt_length(index: int, min_len: int, max_len: int, seed: int) -> int:
    """The length of prompt `index`, spread over [min_len, max_len]: a golden-ratio sequence from a seeded
    phase, so that every stretch of the stream covers the range evenly (and neighbours are far apart)."""
    phase = random.Random(seed).random()
    span = max_len - min_len + 1
    return min_len + min(int(((phase + index * _GOLDEN) % 1.0) * span), span - 1)


def load_documents(path: str | Path, split: str = "test") -> dict[str, list[Document]]:
    """A corpus's documents by domain: `path` is a corpus directory (its `split`.jsonl), a directory of
    jsonl files (the committed held-out documents, one file per domain) or one jsonl file."""
    path = Path(path)
    if path.is_file():
        docs = list(iter_jsonl(path))
    elif (path / f"{split}.jsonl").is_file():
        docs = list(iter_split(path, split))
    elif path.is_dir() and any(path.glob("*.jsonl")):
        docs = [d for f in sorted(path.glob("*.jsonl")) for d in iter_jsonl(f)]
    else:
        raise ConfigError(f"--data {path}: not a corpus directory (with {split}.jsonl), a directory of jsonl "
                          "files or a jsonl file; build one with `moeflow data build DIR`")
    by_domain: dict[str, list[Document]] = {}
    for d in docs:
        by_domain.setdefault(d.domain, []).append(d)
    if not by_domain:
        raise ConfigError(f"--data {path} holds no documents")
    return by_domain


class Workload:
    """A stream of benchmark requests. Subclasses make prompt i in `_make(i)`."""

    name = ""
    degenerate = False

    def __init__(self, output_len: int, seed: int):
        if output_len < 2:
            raise ConfigError("the output length must be at least 2 tokens: decode figures need a decode step")
        self.output_len = output_len
        self.seed = seed
        self._prompts: list[tuple[list[int], str]] = []

    def requests(self, start: int, count: int) -> list[Request]:
        """Requests start .. start+count-1 of the stream."""
        while len(self._prompts) < start + count:
            self._prompts.append(self._make(len(self._prompts)))
        return [Request(ids, self.params(start + i), domain)
                for i, (ids, domain) in enumerate(self._prompts[start : start + count])]

    def params(self, index: int) -> SamplingParams:
        raise NotImplementedError

    def _make(self, index: int) -> tuple[list[int], str]:
        raise NotImplementedError

    @property
    def max_prompt_len(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        """The workload's parameters, for a report's header."""
        raise NotImplementedError

    @property
    def note(self) -> str | None:
        """A line a report must carry about this workload."""
        return DEGENERATE_NOTE if self.degenerate else None


class TextWorkload(Workload):
    name = "text"

    def __init__(self, documents: dict[str, list[Document]], tokenize: Callable[[str], list[int]], *,
                 min_len: int = 64, max_len: int = 256, output_len: int = 64, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0, source: str = ""):
        super().__init__(output_len, seed)
        if not 1 <= min_len <= max_len:
            raise ConfigError(f"prompt lengths must satisfy 1 <= min <= max, got {min_len}-{max_len}")
        self.domains = [d for d in DOMAINS if d in documents] + sorted(set(documents) - set(DOMAINS))
        self.tokenize = tokenize
        self.min_len, self.max_len = min_len, max_len
        self.temperature, self.top_p = temperature, top_p
        self.source = source
        # each domain's documents in a seeded order, read from a cursor that wraps around
        self._docs = {}
        for domain in self.domains:
            docs = sorted(documents[domain], key=lambda d: d.doc_id)
            random.Random(f"{seed}/{domain}").shuffle(docs)
            self._docs[domain] = docs
        self._cursor = dict.fromkeys(self.domains, 0)
        self.documents_used = 0
        self.documents_reused = 0  # taken again after a domain ran out

    def params(self, index: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.output_len, temperature=self.temperature, top_p=self.top_p,
                              seed=request_seed(self.seed, index), ignore_eos=True)

    @property
    def max_prompt_len(self) -> int:
        return self.max_len

    def _make(self, index: int) -> tuple[list[int], str]:
        domain = self.domains[index % len(self.domains)]
        length = prompt_length(index, self.min_len, self.max_len, self.seed)
        docs = self._docs[domain]
        pieces: list[str] = []
        ids: list[int] = []
        for _ in range(len(docs)):
            at = self._cursor[domain]
            self._cursor[domain] = at + 1
            self.documents_used += 1
            self.documents_reused += at >= len(docs)
            pieces.append(docs[at % len(docs)].text[: _MAX_CHARS_PER_TOKEN * length])
            ids = self.tokenize("\n\n".join(pieces))
            if len(ids) >= length:
                return ids[:length], domain
        raise ConfigError(f"the {domain} documents hold {len(ids)} tokens in all, fewer than a prompt of {length}")

    def describe(self) -> dict:
        return {"workload": "text", "data": self.source, "domains": self.domains,
                "prompt_len": [self.min_len, self.max_len], "output_len": self.output_len,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "seeds": "one per request", "ignore_eos": True, "documents_used": self.documents_used,
                "documents_reused": self.documents_reused}


class SyntheticWorkload(Workload):
    name = "synthetic"
    degenerate = True

    def __init__(self, vocab_size: int, *, prompt_len: int = 64, output_len: int = 64, seed: int = 0):
        super().__init__(output_len, seed)
        if prompt_len < 1:
            raise ConfigError("--prompt-len must be at least 1")
        self.vocab_size, self.prompt_len = vocab_size, prompt_len

    def params(self, index: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.output_len, temperature=0.0, ignore_eos=True)

    @property
    def max_prompt_len(self) -> int:
        return self.prompt_len

    def _make(self, index: int) -> tuple[list[int], str]:
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(1, self.vocab_size, self.prompt_len).tolist(), ""

    def describe(self) -> dict:
        return {"workload": "synthetic", "prompt_len": self.prompt_len, "output_len": self.output_len,
                "decoding": "greedy", "ignore_eos": True, "seed": self.seed, "routing": "degenerate"}


def describe_line(meta: dict) -> str:
    """One line naming a workload and its parameters (from `Workload.describe()`)."""
    if meta["workload"] == "text":
        lo, hi = meta["prompt_len"]
        reused = f", {meta['documents_reused']} documents taken twice" if meta.get("documents_reused") else ""
        return (f"text: documents of {meta['data'] or 'the corpus test split'}, domains in turn "
                f"({', '.join(meta['domains'])}), prompts cut to {lo}-{hi} tokens{reused}; sampling at temperature "
                f"{meta['temperature']:g}, top_p {meta['top_p']:g}, a seed per request (workload seed "
                f"{meta['seed']}); {meta['output_len']} output tokens, EOS ignored")
    return (f"synthetic: random token ids, {meta['prompt_len']}-token prompts, greedy, {meta['output_len']} output "
            f"tokens, EOS ignored (seed {meta['seed']})")
