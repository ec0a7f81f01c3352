import numpy as np
import pytest

from moeflow.train.routing_stats import (consecutive_overlap, entropy_bits, expert_counts, js_divergence,
                                         routing_report, successor_sets, successor_top1)

E, K, L = 8, 2, 3


def test_js_divergence_bounds():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.array([1.0, 0, 0, 0]), np.array([0, 0, 0, 1.0])) == pytest.approx(1.0)
    assert 0 < js_divergence(p, p[::-1]) < 1
    assert js_divergence(p * 10, p) == pytest.approx(0.0, abs=1e-12)  # normalises its inputs


def test_entropy_of_balanced_and_collapsed_load():
    assert entropy_bits(np.ones(E)) == pytest.approx(np.log2(E))
    assert entropy_bits(np.eye(E)[0]) == pytest.approx(0.0)


def test_deterministic_layer_chain_is_fully_predictable():
    rng = np.random.default_rng(0)
    first = np.stack([rng.permutation(E)[:K] for _ in range(500)])  # [N, K]
    routes = np.stack([(first + l) % E for l in range(L)], axis=1)  # layer l+1 = layer l shifted by one
    top1 = successor_top1(routes[:250], routes[250:], E)
    sets = successor_sets(routes[:250], routes[250:], E)
    assert len(top1) == len(sets) == L - 1
    assert all(r["accuracy"] == 1.0 and r["chance"] == 1 / E for r in top1)
    assert all(r["recall"] == 1.0 and r["chance"] == K / E and r["marginal"] < 0.6 for r in sets)


def test_overlap_of_constant_and_random_routing():
    const = np.broadcast_to(np.arange(K), (4, 16, L, K)).copy()
    assert all(r["overlap"] == 1.0 for r in consecutive_overlap([const], E))
    rng = np.random.default_rng(1)
    rand = np.stack([rng.permutation(E)[:K] for _ in range(4 * 400 * L)]).reshape(4, 400, L, K)
    for r in consecutive_overlap([rand], E):
        assert r["overlap"] == pytest.approx(K / E, abs=0.03)
        assert r["independent"] == pytest.approx(K / E, abs=0.01)


def test_report_values_in_range():
    rng = np.random.default_rng(2)
    routes = {d: np.stack([rng.permutation(E)[:K] for _ in range(3 * 20 * L)]).reshape(3, 20, L, K)
              for d in ("a", "b")}
    rep = routing_report(routes, routes, E)
    assert rep["tokens"] == {"a": 60, "b": 60}
    assert all(0 <= h <= np.log2(E) for h in rep["load_entropy_bits"])
    assert all(0 <= v <= 1 for d in rep["domain_js_bits"] for v in rep["domain_js_bits"][d])
    usage = np.array(rep["expert_usage"]["a"])
    assert usage.shape == (L, E) and np.allclose(usage.sum(1), 1.0)
    assert expert_counts(routes["a"], E).sum() == 60 * L * K
