"""A synthetic six-domain corpus with a trained byte-level BPE, and a micro model trained on it (once per session).

Each domain draws words from its own vocabulary with a domain-specific bigram habit, so a model can learn
something (and route by domain) within a few steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from moeflow.data.corpus import DOMAINS, Document, write_jsonl
from moeflow.data.tokenizer import save_tokenizer, train_tokenizer
from moeflow.train.presets import PRESETS
from moeflow.train.trainer import TrainJob, train

SYLLABLES = {
    "wiki_en": ["the", "of", "and", "city", "river", "war", "king", "state", "born", "known"],
    "wiki_fr": ["le", "la", "des", "est", "une", "ville", "guerre", "roi", "né", "connu"],
    "wiki_es": ["el", "los", "es", "una", "ciudad", "río", "guerra", "rey", "nació", "conocido"],
    "shakespeare": ["thou", "thee", "hath", "doth", "lord", "sweet", "love", "death", "O", "ay"],
    "python_docs": ["def", "return", "None", "self", "import", "class", "module", "list", "()", "="],
    "fortunes": ["you", "will", "luck", "day", "never", "always", "money", "friend", "--", "!"],
}

MICRO = dataclasses.replace(
    PRESETS["tiny"], name="micro", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
    moe_intermediate_size=16, num_experts=8, top_k=2, max_position_embeddings=128, seq_len=32, micro_batch=4,
    steps=4, warmup_steps=2, eval_every=2, eval_windows_per_domain=1,
)


def _text(rng: np.random.Generator, words: list[str], n: int) -> str:
    out, w = [], int(rng.integers(len(words)))
    for _ in range(n):
        out.append(words[w])
        w = (w + 1) % len(words) if rng.random() < 0.6 else int(rng.integers(len(words)))
    return " ".join(out) + "."


def make_corpus(root: Path, docs_per_domain: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Document]] = {"train": [], "validation": [], "test": []}
    for domain in DOMAINS:
        for i in range(docs_per_domain):
            split = "train" if i < docs_per_domain * 2 // 3 else ("validation" if i % 2 else "test")
            splits[split].append(Document(f"{domain}/{i:04d}", domain, "synthetic", _text(rng, SYLLABLES[domain], 60)))
    for split, docs in splits.items():
        write_jsonl(root / f"{split}.jsonl", docs)
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    from moeflow.data.corpus import read_split

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer([d.text for d in read_split(corpus, "train")], vocab_size=400), out)
    return out


def run_training(corpus: Path, tokenizer_dir: Path, out: Path, preset=MICRO, device="cpu", **kwargs) -> dict:
    job = TrainJob(preset=preset, data_dir=corpus, tokenizer_dir=tokenizer_dir, out_dir=out, device=device,
                   progress=False, **kwargs)
    return train(job)


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("micro-model")
    run_training(corpus, tokenizer_dir, out)
    return out
