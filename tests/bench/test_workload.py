"""The benchmark workloads: text prompts from held-out documents (lengths, domains, seeds), and synthetic ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.assets import default_model_dir
from moeflow.bench.workload import (SyntheticWorkload, TextWorkload, describe_line, load_documents, prompt_length,
                                    request_seed)
from moeflow.data.corpus import DOMAINS
from moeflow.errors import ConfigError
from moeflow.tokenizer import Tokenizer

HELDOUT = Path(__file__).parents[1] / "data" / "heldout"


@pytest.fixture(scope="module")
def tokenize():
    return Tokenizer(default_model_dir()).encode


@pytest.fixture(scope="module")
def documents():
    return load_documents(HELDOUT)


def test_text_prompts_lengths_domains_and_seeds(tokenize, documents):
    w = TextWorkload(documents, tokenize, seed=3)
    reqs = w.requests(0, 36)
    lengths = [len(r.prompt) for r in reqs]
    assert all(64 <= n <= 256 for n in lengths)
    assert len(set(lengths)) >= 30, "lengths are spread, not one for all"
    assert min(lengths) < 100 and max(lengths) > 220
    assert [r.domain for r in reqs] == list(DOMAINS) * 6, "the six domains in turn"
    for r in reqs:
        p = r.params
        assert (p.max_tokens, p.temperature, p.top_p, p.ignore_eos, p.routing) == (64, 0.8, 0.95, True, "exact")
    seeds = [r.params.seed for r in reqs]
    assert len(set(seeds)) == len(seeds) and seeds[5] == request_seed(3, 5)
    # fortunes are a few dozen tokens each: their prompts are several fortunes joined, still cut to length
    fortunes = [r for r in reqs if r.domain == "fortunes"]
    assert all("\n\n" in Tokenizer(default_model_dir()).decode(r.prompt) for r in fortunes)
    # deterministic, and a stream: a later call for an earlier stretch gives the same requests
    again = TextWorkload(documents, tokenize, seed=3)
    assert again.requests(6, 6) == reqs[6:12] and again.requests(0, 36) == reqs
    other = TextWorkload(documents, tokenize, seed=4).requests(0, 6)
    assert [r.prompt for r in other] != [r.prompt for r in reqs[:6]]
    assert reqs[0].with_routing("lynx").params.routing == "lynx" and reqs[0].params.routing == "exact"
    meta = w.describe()
    assert meta["workload"] == "text" and meta["prompt_len"] == [64, 256] and meta["documents_used"] >= 36
    assert "domains in turn" in describe_line(meta) and "temperature 0.8" in describe_line(meta)
    assert w.note is None


def test_prompt_lengths_cover_the_range():
    lengths = [prompt_length(i, 64, 256, seed=0) for i in range(96)]
    quarters = [sum(64 + 48 * q <= n < 64 + 48 * (q + 1) + (q == 3) for n in lengths) for q in range(4)]
    assert all(20 <= q <= 28 for q in quarters), quarters


def test_documents_from_a_corpus_dir_a_file_or_a_jsonl_dir(tmp_path, documents):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [json.dumps({"doc_id": f"wiki_en/{i}", "domain": "wiki_en", "source": "s", "text": f"doc {i}"})
            for i in range(3)]
    (corpus / "test.jsonl").write_text("\n".join(rows) + "\n")
    (corpus / "train.jsonl").write_text(rows[0] + "\n")
    assert [d.doc_id for d in load_documents(corpus)["wiki_en"]] == ["wiki_en/0", "wiki_en/1", "wiki_en/2"]
    assert len(load_documents(corpus / "train.jsonl")["wiki_en"]) == 1
    assert set(documents) == set(DOMAINS)
    with pytest.raises(ConfigError, match="not a corpus directory"):
        load_documents(tmp_path / "missing")
    few = TextWorkload(load_documents(corpus), lambda text: list(range(len(text.split()))), min_len=64, max_len=64)
    with pytest.raises(ConfigError, match="fewer than a prompt"):
        few.requests(0, 1)


def test_synthetic_workload_is_labelled_degenerate():
    w = SyntheticWorkload(1000, prompt_len=16, output_len=8, seed=1)
    reqs = w.requests(0, 4)
    assert all(len(r.prompt) == 16 and all(1 <= t < 1000 for t in r.prompt) for r in reqs)
    assert all(r.params.greedy and r.params.ignore_eos and r.params.max_tokens == 8 for r in reqs)
    assert SyntheticWorkload(1000, prompt_len=16, output_len=8, seed=1).requests(2, 2) == reqs[2:]
    assert w.degenerate and "degenerate" in w.note and "loop" in w.note
    assert w.describe()["routing"] == "degenerate" and "greedy" in describe_line(w.describe())


def test_side_by_side_arms_on_one_engine():
    """bench.runs.text_engine, alternate and arm_columns, as the A/B tools under tools/ use them: each arm's set-up
    runs after its configuration is applied and before its run, every round, and the columns summarise the runs."""
    from moeflow.bench import axes
    from moeflow.bench.runs import alternate, arm_columns, text_engine

    llm, workload = text_engine(str(default_model_dir()), str(HELDOUT), 2, output_len=3, device="cpu")
    engine = llm.engine
    assert engine.max_model_len == 256 + 3 + 8 and workload.output_len == 3
    seen = []
    lru = axes.listed(["none/exact/fcfs"])[0]
    arms = {"a": (lru, lambda: seen.append(("a", engine.predictor))),
            "b": (axes.listed(["frequency/exact/fcfs"])[0], lambda: seen.append(("b", engine.predictor.name)))}
    batch = workload.requests(0, 2)
    runs, last = alternate(engine, arms, "25%", [batch], workload.requests(2, 2), 2, {"batch": 2})
    assert seen == [("a", None), ("b", "frequency")] * 2, "each set-up after its configuration, every round"
    assert {n: len(v) for n, v in runs.items()} == {"a": 2, "b": 2} and last["a"].outputs == last["b"].outputs
    cols = arm_columns(runs, last)
    assert cols["a_tokens_per_s"] == max(runs["a"]) and cols["b_predictor_share"] >= 0
    assert cols["a_mb_per_token"] == last["a"].bytes_per_token / 1e6 and cols["belady_mb_per_token"] > 0
