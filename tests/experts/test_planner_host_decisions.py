"""The predictive cache's decisions, pinned: a change that only makes the planner or the cache cheaper on the host
must load, evict, prefetch and protect exactly what it did before.

A synthetic trace (routes from an integer formula, no RNG, no model run) goes through the replay with a scripted
predictor whose scores, next-step scores and refinements are plain arithmetic on the routes, so the figures are
the same on any machine. Every part of ExpertFlowPlanner acts on it: quotas, protection and priorities, prefetch
(with guesses the refinement later drops) and correction.

The expected figures were obtained by running this file's `decisions` with the cache and planner as they were
before their host-time rewrite (moeflow at commit f6881b2), and must not change with a speed-up; those of slots
shared by value (the planner's default), before a run of evictions by value kept its candidates (commit 56c019a).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from moeflow.assets import default_model_dir
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import decode_steps, make_cache, replay
from moeflow.routing.predictors.base import Prediction, PredictorBase
from moeflow.weights.checkpoint import Checkpoint

FIELDS = ("hits", "misses", "bytes_moved", "prefetches", "prefetch_bytes", "prefetch_hits", "wasted_prefetches")


def synthetic_routes(lengths: list[int], L: int, E: int, K: int) -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """Token ids [N] and routes [N, L, K] of sequences of `lengths` tokens. Sequence q's layer l picks K distinct
    experts (a*(j + shift) + b) % E, a odd and E a power of two; `shift` moves by one every 4 tokens, so
    consecutive tokens share most of their experts, as real routes do."""
    assert E & (E - 1) == 0
    rows, ids, sequences, start = [], [], [], 0
    for q, n in enumerate(lengths):
        for t in range(n):
            shift = t // 4 + q
            route = [[(a * (j + shift) + 5 * l + 3 * q) % E for j in range(K)]
                     for l in range(L) for a in [2 * ((q + l + t // 16) % 8) + 1]]
            rows.append(route)
            ids.append((q * 31 + t * 7) % 500 + 1)
        sequences.append(slice(start, start + n))
        start += n
    return np.array(ids, dtype=np.int64), np.array(rows, dtype=np.int64), sequences


class ScriptedPredictor(PredictorBase):
    """Knows the steps' routes and blurs them by rule: most used experts score 0.9, one in five 0.3 (a miss), and
    one unused expert in seven 0.85 (a false guess); next_scores do the same for the step after. refine() sharpens
    the layer after the one that routed: its used experts 0.95, its false guesses 0.2."""

    name = "scripted"

    def __init__(self, steps):
        self.steps = steps

    def _scores(self, i: int) -> np.ndarray:
        used = self.steps[i].routes.used
        L, E = used.shape
        code = np.arange(L)[:, None] * 3 + np.arange(E)[None, :] + i
        s = np.where(used, np.where(code % 5 == 0, 0.3, 0.9), np.where(code % 7 == 0, 0.85, 0.05))
        return s

    def predict(self, view) -> Prediction:
        i = view.index
        p = Prediction(scores=self._scores(i).astype(np.float32))
        if i + 1 < len(self.steps):
            p.next_scores = self._scores(i + 1).astype(np.float32)
        return p

    def refine(self, view, layer: int, routes_so_far) -> Prediction | None:
        s = self._scores(view.index)
        used = self.steps[view.index].routes.used
        nxt = layer + 1
        if nxt >= s.shape[0]:
            return None
        s[nxt] = np.where(used[nxt], 0.95, np.where(s[nxt] > 0.5, 0.2, s[nxt]))
        return Prediction(scores=s.astype(np.float32))


def decisions(slots: int, batch: int, planner: ExpertFlowPlanner) -> dict:
    """The replay's counters and a digest of where every expert lived at the end of every step."""
    spec = Checkpoint(default_model_dir()).spec
    L, E, K = spec.num_moe_layers, spec.num_experts, spec.router.top_k
    token_ids, routes, sequences = synthetic_routes([40, 25, 60, 33, 47, 18, 52, 29], L, E, K)
    steps = decode_steps(token_ids, routes, sequences, batch, E)
    cache = make_cache(spec, slots, expert_bytes=1000)
    h = hashlib.sha256()

    def snapshot(_: int) -> None:
        h.update(cache.slot_of.astype(np.int64).tobytes())

    r = replay(steps, cache, ScriptedPredictor(steps), planner, on_step=snapshot)
    return {"stats": [getattr(r.stats, f) for f in FIELDS], "slot_of_digest": h.hexdigest()[:16]}


# slots, batch -> counters (FIELDS) and digest, from the code before the host-time rewrite (see the docstring)
EXPECTED = {
    (12, 1): {"stats": [2635, 7093, 7093000, 140, 140000, 101, 39], "slot_of_digest": "e5f240ce6fc7d708"},
    (12, 4): {"stats": [139, 8068, 8068000, 11, 11000, 7, 4], "slot_of_digest": "42bcea6b6a9a40ff"},
    (25, 1): {"stats": [6661, 3067, 3067000, 986, 986000, 551, 435], "slot_of_digest": "08dd3d138c5daeb1"},
    (25, 4): {"stats": [1267, 6940, 6940000, 48, 48000, 30, 18], "slot_of_digest": "6a79d71c428661a2"},
    (64, 1): {"stats": [9204, 524, 524000, 10015, 10015000, 1120, 8865], "slot_of_digest": "a33c7318f4a4844f"},
    (64, 4): {"stats": [4746, 3461, 3461000, 681, 681000, 187, 462], "slot_of_digest": "0b759af3d12cfe50"},
}


@pytest.mark.parametrize("slots,batch", sorted(EXPECTED))
def test_replay_decisions_are_pinned(slots, batch):
    # slots shared by count quotas, set again after every router, as the planner did by default when these
    # figures were taken: the path with the most decisions in it
    assert decisions(slots, batch, ExpertFlowPlanner(requota=True, by_value=False)) == EXPECTED[slots, batch]


# slots, batch, rounds -> the same, slots shared by value (see the docstring)
EXPECTED_BY_VALUE = {
    (12, 1, 0): {"stats": [3001, 6727, 6727000, 1535, 1535000, 1178, 357], "slot_of_digest": "9fe59b92fec030d1"},
    (12, 1, 1): {"stats": [3643, 6085, 6085000, 394, 394000, 389, 5], "slot_of_digest": "9ce73141f84255bf"},
    (12, 4, 0): {"stats": [257, 7950, 7950000, 459, 459000, 157, 302], "slot_of_digest": "71c4339ba1f0b63b"},
    (12, 4, 1): {"stats": [891, 7316, 7316000, 25, 25000, 25, 0], "slot_of_digest": "ee75889e8affb344"},
    (25, 1, 0): {"stats": [6973, 2755, 2755000, 1499, 1499000, 797, 702], "slot_of_digest": "5e93ee847d230fca"},
    (25, 1, 1): {"stats": [7339, 2389, 2389000, 588, 588000, 535, 53], "slot_of_digest": "79600f93f1fcd02b"},
    (25, 4, 0): {"stats": [1634, 6573, 6573000, 1018, 1018000, 774, 244], "slot_of_digest": "4d373e801c7954ed"},
    (25, 4, 1): {"stats": [2194, 6013, 6013000, 61, 61000, 61, 0], "slot_of_digest": "bbd95f27cb601d04"},
    (64, 1, 0): {"stats": [9669, 59, 59000, 9349, 9349000, 997, 8343], "slot_of_digest": "885ff36d9274ad4c"},
    (64, 1, 1): {"stats": [9666, 62, 62000, 9354, 9354000, 1004, 8341], "slot_of_digest": "d3e37738f22e2b81"},
    (64, 4, 0): {"stats": [5321, 2886, 2886000, 1486, 1486000, 971, 497], "slot_of_digest": "80e6899e4b239879"},
    (64, 4, 1): {"stats": [5438, 2769, 2769000, 654, 654000, 439, 200], "slot_of_digest": "26be101e74b1a586"},
}


@pytest.mark.parametrize("slots,batch,rounds", sorted(EXPECTED_BY_VALUE))
def test_replay_decisions_by_value_are_pinned(slots, batch, rounds):
    assert decisions(slots, batch, ExpertFlowPlanner(rounds=rounds)) == EXPECTED_BY_VALUE[slots, batch, rounds]
