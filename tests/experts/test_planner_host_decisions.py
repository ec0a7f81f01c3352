"""The predictive cache's decisions, pinned: a change that only makes the planner or the cache cheaper on the host
must load, evict, prefetch and protect exactly what it did before.

A synthetic trace (routes from an integer formula, no RNG, no model run) goes through the replay with a scripted
predictor whose scores, next-step scores and refinements are plain arithmetic on the routes, so the figures are
the same on any machine. Every part of ExpertFlowPlanner acts on it: quotas, protection and priorities, prefetch
(with guesses the refinement later drops) and correction.

The expected figures were obtained by running this file's `decisions` with the cache and planner as they were
before their host-time rewrite (moeflow at commit f6881b2), and must not change with a speed-up.
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


def decisions(slots: int, batch: int) -> dict:
    """The replay's counters and a digest of where every expert lived at the end of every step."""
    spec = Checkpoint(default_model_dir()).spec
    L, E, K = spec.num_moe_layers, spec.num_experts, spec.router.top_k
    token_ids, routes, sequences = synthetic_routes([40, 25, 60, 33, 47, 18, 52, 29], L, E, K)
    steps = decode_steps(token_ids, routes, sequences, batch, E)
    cache = make_cache(spec, slots, expert_bytes=1000)
    h = hashlib.sha256()

    def snapshot(_: int) -> None:
        h.update(cache.slot_of.astype(np.int64).tobytes())

    # slots shared by count quotas, set again after every router, as the planner did by default when these
    # figures were taken: the path with the most decisions in it
    r = replay(steps, cache, ScriptedPredictor(steps), ExpertFlowPlanner(requota=True, by_value=False),
               on_step=snapshot)
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
    assert decisions(slots, batch) == EXPECTED[slots, batch]
