import numpy as np

from moeflow.data.corpus import read_split
from moeflow.train.data import DomainSampler, load_tokenizer, pack, token_streams


def test_streams_prefix_every_document_with_the_separator(corpus, tokenizer_dir):
    tokenizer, sep = load_tokenizer(tokenizer_dir)
    docs = read_split(corpus, "validation")
    streams = token_streams(tokenizer, docs, sep)
    assert sorted(streams) == sorted({d.domain for d in docs})
    for domain, stream in streams.items():
        n_docs = sum(d.domain == domain for d in docs)
        assert stream[0] == sep and (stream == sep).sum() == n_docs
        assert tokenizer.decode(stream[1:20].tolist()).split()[0] in next(d.text for d in docs if d.domain == domain)


def test_pack_drops_the_tail():
    w = pack(np.arange(10, dtype=np.int32), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack(np.arange(10), 4, max_windows=1).shape == (1, 4)


def test_sampler_is_seeded_and_lifts_small_domains():
    windows = {"big": np.zeros((900, 4), np.int32), "small": np.ones((100, 4), np.int32)}
    a, b = DomainSampler(windows, 0.5, seed=3), DomainSampler(windows, 0.5, seed=3)
    assert np.array_equal(a.next_batch(64), b.next_batch(64))
    assert np.allclose(a.probabilities, [0.75, 0.25])  # sqrt(900) : sqrt(100)
    batch = np.concatenate([a.next_batch(64) for _ in range(50)])
    assert 0.2 < (batch[:, 0] == 1).mean() < 0.3


def test_sampler_sees_every_window_before_repeating():
    windows = {"d": np.arange(20, dtype=np.int32).reshape(10, 2)}
    s = DomainSampler(windows, 1.0, seed=0)
    firsts = s.next_batch(10)[:, 0]
    assert sorted(firsts.tolist()) == list(range(0, 20, 2))
