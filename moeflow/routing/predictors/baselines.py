"""Cheap routing predictors to score the learned one against, fitted on the same traces (route_data.RouteData).

Shapes: n tokens scored, L MoE layers, E experts per layer, K top-k, V vocabulary.

Each baseline gives, for every token, a probability per layer and expert that the token picks it ([n, L, E],
summing to about K per layer), so the same recall and batch-union figures apply to all of them:

- frequency: each layer's global expert frequency (the same guess for every token);
- token: a per-token-id table of how often each token picked each expert, smoothed towards the frequency
  (unseen tokens get the frequency);
- previous: the previous token's experts (the sequence's first token: the frequency);
- layer: layer-to-layer transitions, P(e at l | the token's experts at l-1), from co-occurrence counts. It needs
  the token's own route at the layer before, so it is a refined predictor: unrefined, it chains from the
  frequency at layer 0 through expected routes.
`refined` returns layer l's scores given the token's real routes at layers < l where the baseline can use them,
else None (its refined scores are its plain ones).
"""

from __future__ import annotations

import numpy as np

from moeflow.routing.predictors.route_data import RouteData


class Baseline:
    name = "baseline"

    def fit(self, data: RouteData) -> Baseline:
        raise NotImplementedError

    def scores(self, data: RouteData, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def refined(self, data: RouteData, rows: np.ndarray) -> np.ndarray | None:
        return None


def _frequency(data: RouteData) -> np.ndarray:
    """[L, E] share of tokens that picked each expert."""
    counts = np.zeros((data.num_layers, data.num_experts))
    for l in range(data.num_layers):
        counts[l] = np.bincount(data.routes[:, l].ravel().astype(np.int64), minlength=data.num_experts)
    return (counts / max(1, data.num_tokens)).astype(np.float32)


class FrequencyBaseline(Baseline):
    name = "frequency"

    def fit(self, data: RouteData) -> FrequencyBaseline:
        self.freq = _frequency(data)
        return self

    def scores(self, data: RouteData, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.freq, (len(rows), *self.freq.shape)).copy()


class TokenTableBaseline(Baseline):
    name = "token"

    def __init__(self, prior: float = 1.0):
        self.prior = prior  # pseudo-count of the frequency in each token's estimate

    def fit(self, data: RouteData) -> TokenTableBaseline:
        self.freq = _frequency(data)
        self.vocab, inverse = np.unique(data.token_ids, return_inverse=True)
        L, E = data.num_layers, data.num_experts
        self.counts = np.zeros((len(self.vocab), L, E), dtype=np.float32)
        for a in range(0, data.num_tokens, 65536):
            rows = np.arange(a, min(a + 65536, data.num_tokens))
            np.add.at(self.counts, inverse[rows], data.multi_hot(rows))
        self.seen = np.bincount(inverse, minlength=len(self.vocab)).astype(np.float32)
        return self

    def scores(self, data: RouteData, rows: np.ndarray) -> np.ndarray:
        ids = data.token_ids[rows]
        at = np.clip(np.searchsorted(self.vocab, ids), 0, len(self.vocab) - 1)
        known = self.vocab[at] == ids
        out = np.broadcast_to(self.freq, (len(rows), *self.freq.shape)).copy()
        k = at[known]
        out[known] = (self.counts[k] + self.prior * self.freq) / (self.seen[k] + self.prior)[:, None, None]
        return out


class PreviousBaseline(Baseline):
    name = "previous"

    def fit(self, data: RouteData) -> PreviousBaseline:
        self.freq = _frequency(data)
        return self

    def scores(self, data: RouteData, rows: np.ndarray) -> np.ndarray:
        last = data.last_multi_hot(rows)
        out = 0.98 * last + 0.02 * self.freq  # the frequency only breaks ties among the unpicked
        out[data.starts[rows]] = self.freq
        return out


class LayerTransitionBaseline(Baseline):
    name = "layer"

    def fit(self, data: RouteData) -> LayerTransitionBaseline:
        self.freq = _frequency(data)
        L, E, K = data.num_layers, data.num_experts, data.top_k
        joint = np.zeros((L - 1, E, E), dtype=np.float64)
        for a in range(0, data.num_tokens, 65536):
            hot = data.multi_hot(np.arange(a, min(a + 65536, data.num_tokens)))
            joint += np.einsum("nle,nlf->lef", hot[:, :-1], hot[:, 1:])
        src = np.stack([self.freq[l] * data.num_tokens for l in range(L - 1)])  # [L-1, E] picks at l
        # P(f at l+1 | e at l) / K: a token's K experts each vote; the votes sum to about K
        self.cond = (joint / np.maximum(src, 1.0)[:, :, None] / K).astype(np.float32)
        return self

    def scores(self, data: RouteData, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.freq.shape), dtype=np.float32)
        out[:, 0] = self.freq[0]
        for l in range(1, out.shape[1]):
            out[:, l] = out[:, l - 1] @ self.cond[l - 1]
        return out

    def refined(self, data: RouteData, rows: np.ndarray) -> np.ndarray:
        hot = data.multi_hot(rows)
        out = np.empty_like(hot)
        out[:, 0] = self.freq[0]
        out[:, 1:] = np.einsum("nle,lef->nlf", hot[:, :-1], self.cond)
        return out


BASELINES = {b.name: b for b in (FrequencyBaseline, TokenTableBaseline, PreviousBaseline, LayerTransitionBaseline)}


def fit_baselines(data: RouteData, names: list[str] | None = None) -> dict[str, Baseline]:
    return {n: BASELINES[n]().fit(data) for n in (names or list(BASELINES))}
