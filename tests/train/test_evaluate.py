import json
import math

import numpy as np
import pytest

from moeflow.train import card, evaluate
from moeflow.data.corpus import read_split


def test_unigram_add_one_by_hand():
    counts = evaluate.unigram_counts({"a": np.array([0, 0, 1], np.int32)}, vocab_size=4)
    assert counts.tolist() == [2, 1, 0, 0]
    lp = evaluate.unigram_log_probs(counts)  # (c + 1) / (3 + 4)
    assert np.exp(lp).tolist() == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7])
    ppl = evaluate.unigram_perplexity(lp, {"x": np.array([[3, 0, 2]])})  # scores tokens 0 and 2
    assert ppl["x"] == pytest.approx(math.exp(-(math.log(3 / 7) + math.log(1 / 7)) / 2))
    assert ppl["all"] == pytest.approx(ppl["x"])


def test_unigram_baseline_on_toy_text(corpus, tokenizer_dir):
    ppl = evaluate.unigram_baseline(tokenizer_dir, read_split(corpus, "train"), read_split(corpus, "test"),
                                    seq_len=32)
    assert set(ppl) == {"wiki_en", "wiki_fr", "wiki_es", "shakespeare", "python_docs", "fortunes", "all"}
    assert all(1 < v < 400 for v in ppl.values())  # below uniform over the 400-token vocabulary


def test_perplexity_per_domain(micro_model, corpus):
    ppl = evaluate.perplexity(micro_model, read_split(corpus, "test"), max_tokens=64)
    assert set(ppl) >= {"wiki_en", "fortunes", "all"}
    assert all(np.isfinite(v) and v > 1 for v in ppl.values())


def test_card_writes_its_files(micro_model, corpus):
    path = card.write_card(micro_model, corpus, max_tokens=96, device="cpu")
    text = path.read_text()
    for heading in ("## Architecture", "## Training", "## Held-out perplexity", "## Routing", "CC BY-SA 4.0"):
        assert heading in text
    assert "expert_usage.png" in text and (micro_model / "expert_usage.png").stat().st_size > 1000
    stats = json.loads((micro_model / "routing_stats.json").read_text())
    assert set(stats["perplexity"]) == {"model", "unigram"}
    r = stats["routing"]
    assert len(r["load_entropy_bits"]) == 2 and r["load_entropy_max_bits"] == pytest.approx(3.0)
    assert len(r["top1_successor"]) == 1 and len(r["consecutive_overlap"]) == 2
    assert "routing_at_init" in stats
