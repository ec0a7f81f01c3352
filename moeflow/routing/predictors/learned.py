"""`learned`: a small network, trained from routing traces, that predicts every MoE layer's experts for each
sequence's next token before the step runs (ExpertFlow's routing-path predictor).

Shapes: B sequences in the step, L MoE layers, E experts per layer, K top-k, H the model's hidden size.

What it reads for each sequence, all known before the step:
  cur   the token about to be routed (decode: the one just sampled), as the model's own input embedding,
        RMS-normalised [H] (the model's weights, borrowed, not a copy: the predictor's own bytes stay small, and a
        token the traces never showed still gets a meaningful input)
  prev  the token before it, likewise (zeros at a sequence's first token)
  last  the previous token's routes at every layer, multi-hot [L*E] (zeros at the first token)
  hist  the sequence's route history: a bias-corrected exponential moving average of its tokens' multi-hot
        routes [L*E] (zeros at the first token); it carries what the document is about
One forward: [W_cur cur | W_prev prev | W_last last | W_hist hist] -> GELU MLP -> 2 x L*E logits; sigmoid of
each is the chance that the token picks that expert, and (second half) that any of the `horizon` tokens after it
will. Trained with binary cross-entropy against the multi-hot top-k. The first half is the step's prediction; the
second tells the cache which experts are worth keeping (eviction's "least likely first" looks that far on).

Refinement (offloaded decode: the host learns each layer's route before the next layer runs): layer l's logits
gain T_l @ m_{l-1}, where m_{l-1} is the layer before's multi-hot route. The term is linear in m, so in a batch,
where the host only learns the union of the batch's experts, each sequence's expected route within that union
stands in for its own.

Online adaptation, no training at run time: per layer, a logit bias that follows the gap between the expected and
the observed number of picks (calibration), and a mixing weight between the network and the sequence's own
route history, moved by which of the two predicted the observed routes better (exponentiated gradient).

The network and PRED_DIR's files are in net.py; a predictor refuses to load for any model but its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeflow.routing.predictors.base import Prediction, PredictorBase, RequestView, StepView
from moeflow.routing.predictors.graphed import GraphedForward, route_logits
from moeflow.routing.predictors.net import PredictorFiles, RouteNet, check_model
from moeflow.routing.record import StepRoutes

PREFILL_TOKENS = 512  # a prefill's prediction covers at most its last this many prompt tokens


def load_predictor(path: str | Path, checkpoint, device: str | torch.device = "cpu", *, adapt: bool = True,
                   embedding: torch.Tensor | None = None) -> LearnedPredictor:
    """The predictor in PRED_DIR `path`, for the model `checkpoint` holds, running on `device`.

    Raises ConfigError if it was trained for another model. `embedding`: the model's token embedding [V, H] if
    the caller already holds it on `device` (the engine does); else it is read from the checkpoint.
    `adapt`: online calibration and history mixing (item (e)); off, the network's scores are used as they are.
    """
    files = PredictorFiles.load(path)
    check_model(files, checkpoint, path)
    files.net.attach_lens(checkpoint)
    device = torch.device(device)
    if embedding is None:
        embedding = checkpoint.tensor("model.embed_tokens.weight").to(device)
    return LearnedPredictor(files.net, embedding, device, adapt=adapt,
                            layer_recall=files.metrics.get("recall_per_layer"))


# -- run time ------------------------------------------------------------------------------------------


@dataclass
class LearnedPrediction(Prediction):
    """A Prediction with one more field: next_scores [L, E], the chance that the step after this one uses each
    expert (what ExpertFlowPlanner keeps experts for, once their layer has routed)."""

    next_scores: np.ndarray | None = None


@dataclass
class _Sequence:
    """What a running sequence's prediction needs: its last token, that token's routes, its route history."""

    last_token: int = -1
    last_routes: np.ndarray | None = None  # [L, K]
    ema: np.ndarray | None = None  # [L, E] raw exponential moving average of its tokens' multi-hot routes
    seen: int = 0  # tokens in the average (for the bias correction)
    # the network's answer for the state above and the token it feeds next: (that token, logits [2, L, E], the
    # history row [L*E] fed with them); observe() clears it, since the state it was computed from has moved on
    scored: tuple[int, np.ndarray, np.ndarray] | None = None


class OnlineCalibration:
    """Per-layer adaptation of the network's probabilities from observed routes (no gradient training).

    bias[l]: a logit shift per layer, moved so the expected number of picks matches the observed (K per token);
    mix[l]: the weight of the sequence's own route history beside the network, sigmoid(theta[l]), with theta moved
    by the difference of the two forecasters' log-losses on each step's routes (Hedge over two experts), and kept
    within [0, max_mix].
    """

    def __init__(self, num_layers: int, top_k: int, rate: float = 0.05, mix_rate: float = 0.05,
                 max_mix: float = 0.5):
        self.top_k = top_k
        self.bias = np.zeros(num_layers, dtype=np.float64)
        self.theta = np.full(num_layers, -3.0)
        self.rate, self.mix_rate = rate, mix_rate
        self.max_theta = np.log(max_mix / (1 - max_mix))

    @property
    def mix(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.theta))

    def network(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits + self.bias[None, :, None])

    def apply(self, logits: np.ndarray, hist: np.ndarray) -> np.ndarray:
        """logits, hist [B, L, E] -> probabilities [B, L, E], in the logits' precision. The network's are float32, and
        a route-aware scheduler has every running sequence's row calibrated before each step
        (tools/policy_host_time.py --predictor times the rows)."""
        dt = logits.dtype
        m = self.mix.astype(dt)[None, :, None]
        return (1 - m) * sigmoid(logits + self.bias.astype(dt)[None, :, None]) + m * np.minimum(hist, 1.0)

    def update(self, logits: np.ndarray, hist: np.ndarray, actual: np.ndarray) -> None:
        """logits, hist [B, L, E] as predicted; actual [B, L, E] multi-hot of what the tokens picked."""
        p = np.clip(self.network(logits), 1e-4, 1 - 1e-4)
        h = np.clip(hist, 0.02, 0.98)
        self.bias += self.rate * (actual.sum(-1) - p.sum(-1)).mean(0) / self.top_k
        np.clip(self.bias, -2.0, 2.0, out=self.bias)

        picked = actual > 0

        def loss(q: np.ndarray) -> np.ndarray:  # [L] log-loss per pick: one log per entry, of q or of 1 - q
            return -np.log(np.where(picked, q, 1 - q)).sum(-1).mean(0) / self.top_k

        self.theta = np.clip(self.theta + self.mix_rate * (loss(p) - loss(h)), -8.0, self.max_theta)


class LearnedPredictor(PredictorBase):
    name = "learned"

    def __init__(self, net: RouteNet, embedding: torch.Tensor, device: torch.device, *, adapt: bool = True,
                 layer_recall: list[float] | None = None):
        cfg = net.cfg
        self.cfg = cfg
        self.device = device
        self.net = net.to(device).eval()
        self.embedding = embedding
        self.L, self.E, self.K = cfg.num_layers, cfg.num_experts, cfg.top_k
        self.adapt = adapt
        self.calibration = OnlineCalibration(self.L, self.K)
        # host copy for refine(), which runs where the host waits on a router
        self.transition = net.transition.detach().float().cpu().numpy()
        self._seqs: dict[str, _Sequence] = {}
        # this decode step's (index, logits, hist, probs [B, L, E], their union [L, E]); refine() updates the last
        # two in place, row by row, as layers route
        self._step: tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._graphed: GraphedForward | None = None  # the forward as CUDA graphs, once capture_graphs() ran
        self.recall = np.array(layer_recall if layer_recall else [0.5] * self.L, dtype=np.float64)  # [L] running

    # -- requests ----------------------------------------------------------------------------

    def admitted(self, request: RequestView) -> None:
        self._seqs[request.request_id] = _Sequence()

    def finished(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)

    # -- before the step ----------------------------------------------------------------------

    def _prefill_features(self, step: StepView) -> tuple[list[int], list[int], np.ndarray, np.ndarray, list[int]]:
        """Per row (one per prompt token predicted, the last PREFILL_TOKENS of each): its token, the token before,
        no routes and no history; and how many rows each sequence has."""
        cur, prev, counts = [], [], []
        for ids in step.input_ids:
            ids = ids[-PREFILL_TOKENS:]
            cur.extend(ids)
            prev.extend([-1, *ids[:-1]])
            counts.append(len(ids))
        zeros = np.zeros((len(cur), self.L * self.E), dtype=np.float32)
        return cur, prev, zeros, zeros.copy(), counts

    def _decode_features(self, seqs: list[_Sequence]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """One row per sequence: the token before the one it feeds, that token's routes (multi-hot, flat) and the
        sequence's history, the arrays gathered at once."""
        L, E = self.L, self.E
        n = len(seqs)
        last = np.zeros((n, L, E), dtype=np.float32)
        routed = [i for i, s in enumerate(seqs) if s.last_routes is not None]
        if routed:
            hot = np.zeros((len(routed), L, E), dtype=np.float32)
            np.put_along_axis(hot, np.stack([seqs[i].last_routes for i in routed]).astype(np.int64), 1.0, axis=2)
            last[routed] = hot
        hist = np.zeros((n, L, E), dtype=np.float32)
        seen = [i for i, s in enumerate(seqs) if s.seen]
        if seen:
            d = self.cfg.hist_decay
            correction = np.array([1.0 - d ** seqs[i].seen for i in seen])  # the average's bias correction
            hist[seen] = np.stack([seqs[i].ema for i in seen]) / correction[:, None, None]
        return [s.last_token for s in seqs], last.reshape(n, -1), hist.reshape(n, -1)

    def _decode_logits(self, step: StepView) -> tuple[np.ndarray, np.ndarray]:
        """A decode step's logits [B, 2, L, E] and history rows [B, L*E], one row per sequence. A sequence's row is
        computed once for each state it reaches (observe() moves it on) and token it feeds: a scheduler that
        scores every running sequence before a step, and the step that then runs some of them, share one
        forward of the network, and a sequence that sat out a step is not scored again."""
        seqs = [self._seqs.setdefault(rid, _Sequence()) for rid in step.request_ids]
        cur = [ids[-1] for ids in step.input_ids]
        fresh = [i for i, (s, t) in enumerate(zip(seqs, cur)) if s.scored is None or s.scored[0] != t]
        if fresh:
            prev, last, hist = self._decode_features([seqs[i] for i in fresh])
            z = self.logits([cur[i] for i in fresh], prev, last, hist)
            for j, i in enumerate(fresh):
                seqs[i].scored = (cur[i], z[j].copy(), hist[j].copy())
        return (np.stack([s.scored[1] for s in seqs]), np.stack([s.scored[2] for s in seqs]))

    @torch.inference_mode()
    def capture_graphs(self, buckets: tuple[int, ...]) -> None:
        """On CUDA: capture the forward for up to each of `buckets` rows as a CUDA graph (graphed.py); forwards of
        more rows (a prefill, or a scheduler scoring every running sequence) stay eager."""
        if self.device.type == "cuda" and buckets:
            self._graphed = GraphedForward(self.net, self.embedding, self.device, buckets)

    @torch.inference_mode()
    def logits(self, cur: list[int], prev: list[int], last: np.ndarray, hist: np.ndarray) -> np.ndarray:
        """The network's logits [N, 2, L, E] for N rows of features (one forward on the predictor's device)."""
        dense = np.concatenate([last, hist], axis=1)
        if self._graphed is not None and self._graphed.fits(len(cur)):
            z = self._graphed(cur, prev, dense)
        else:
            dev = self.device
            ids = torch.tensor([cur, prev], dtype=torch.int64).to(dev, non_blocking=True)
            z = route_logits(self.net, self.embedding, ids, torch.from_numpy(dense).to(dev, non_blocking=True))
        return z.float().cpu().numpy()

    def predict(self, step: StepView) -> Prediction | None:
        if step.batch_size == 0:
            return None
        if step.is_prefill:
            cur, prev, last, hist, counts = self._prefill_features(step)
            both = self.logits(cur, prev, last, hist)
        else:
            both, hist = self._decode_logits(step)
        z, z_next = both[:, 0], both[:, 1]
        hist = hist.reshape(z.shape)
        if step.is_prefill:
            p, p_next = sigmoid(z), sigmoid(z_next)
            ends = np.cumsum(counts)
            per = np.stack([union(p[e - n : e]) for e, n in zip(ends, counts)])
            nxt = p_next[ends - 1]  # the first decode token follows the last prompt token
        else:
            per = self._chances(z, hist)
            nxt = sigmoid(z_next)
        scores = union(per).astype(np.float32)
        self._step = None if step.is_prefill else (step.index, z, hist, per, scores.copy())
        return LearnedPrediction(scores=scores, per_request=per.astype(np.float32),
                                 confidence=self.recall.astype(np.float32), next_scores=union(nxt).astype(np.float32))

    def _chances(self, z: np.ndarray, hist: np.ndarray) -> np.ndarray:
        """Decode rows' logits and histories [B, L, E] -> each sequence's chance of picking each expert."""
        return self.calibration.apply(z, hist) if self.adapt else sigmoid(z)

    def per_request(self, step: StepView) -> np.ndarray | None:
        """What each sequence of a decode step is expected to route, [B, L, E]: predict()'s per_request alone, for a
        scheduler weighing every running sequence. It computes no union, no look-ahead, and leaves the forecast of
        the step in hand as it is (None for a prefill or an empty step)."""
        if step.batch_size == 0 or step.is_prefill:
            return None
        both, hist = self._decode_logits(step)
        z = both[:, 0]
        return self._chances(z, hist.reshape(z.shape)).astype(np.float32)

    # -- as each layer routes ----------------------------------------------------------------

    def refine(self, step: StepView, layer: int, routes_so_far: list[list[int]]) -> Prediction | None:
        """Layer `layer` has routed: sharpen the next layer's scores with its route (T_{layer+1} @ route).

        Only the rows of `layer` and the next change, so only they are recomputed, in place: this runs on the
        host between a router and the next layer's experts, a dozen times a step. The Prediction returned holds
        views of this step's arrays, valid until the next refine or predict; it carries no per-request scores
        (no one reads them mid-step)."""
        if self._step is None or self._step[0] != step.index or layer + 1 >= self.L:
            return None
        _, z, hist, per, scores = self._step
        used = np.zeros(self.E, dtype=bool)
        used[routes_so_far[layer]] = True
        # each sequence's expected route at `layer` within what the batch used (its exact route at batch 1)
        if per.shape[0] == 1:
            q = used[None, :].astype(np.float64)
        else:
            q = np.where(used[None, :], per[:, layer], 0.0)
            q = np.minimum(1.0, q * (self.K / np.maximum(q.sum(-1, keepdims=True), 1e-9)))
        nxt = layer + 1
        z_next = z[:, nxt] + q @ self.transition[nxt - 1]
        if self.adapt:
            m = 1.0 / (1.0 + np.exp(-self.calibration.theta[nxt]))  # calibration.mix[nxt], for one layer
            per[:, nxt] = (1 - m) * sigmoid(z_next + self.calibration.bias[nxt]) + m * np.minimum(hist[:, nxt], 1.0)
        else:
            per[:, nxt] = sigmoid(z_next)
        per[:, layer] = np.where(used[None, :], np.maximum(per[:, layer], q), 0.0)
        scores[layer : nxt + 1] = union(per[:, layer : nxt + 1])
        return Prediction(scores=scores, confidence=self.recall)

    # -- after the step -----------------------------------------------------------------------

    def observe(self, step: StepView, routes: StepRoutes) -> None:
        L, E = self.L, self.E
        ids = routes.router_ids  # what the router chose: the routing the predictor learns
        if self._step is not None and self._step[0] == step.index and not step.is_prefill:
            _, z, hist, per, _ = self._step
            actual = np.zeros((len(step.request_ids), L, E), dtype=np.float32)
            last_rows = [r.stop - 1 for r in routes.rows]
            np.put_along_axis(actual, ids[:, last_rows].transpose(1, 0, 2).astype(np.int64), 1.0, axis=2)
            top = np.argpartition(-per, self.K - 1, axis=-1)[..., : self.K]
            hit = np.take_along_axis(actual, top, axis=-1).sum(-1).mean(0) / self.K  # [L]
            self.recall = 0.95 * self.recall + 0.05 * hit
            if self.adapt:
                self.calibration.update(z, hist, actual)
        seqs = [self._seqs.setdefault(rid, _Sequence()) for rid in step.request_ids]
        if not seqs:
            return
        last_ids = [int(ids_fed[-1]) for ids_fed in step.input_ids]
        if all(r.stop - r.start == 1 for r in routes.rows):  # a decode step: every sequence at once
            self._learn(seqs, last_ids, ids[:, [r.start for r in routes.rows]].transpose(1, 0, 2)[:, None])
        else:
            for s, last, r in zip(seqs, last_ids, routes.rows):
                self._learn([s], [last], ids[:, r].transpose(1, 0, 2)[None])

    def _learn(self, seqs: list[_Sequence], last_ids: list[int], tok: np.ndarray) -> None:
        """Sequences `seqs` routed their step's t tokens, the last of them `last_ids`, to tok [n, t, L, K] (oldest
        first; t = 1 in a decode step): each one's route history, last routes and last token move on."""
        L, E, d = self.L, self.E, self.cfg.hist_decay
        n, t = tok.shape[:2]
        hot = np.zeros((n, t, L, E), dtype=np.float64)
        np.put_along_axis(hot, tok.astype(np.int64), 1.0, axis=3)
        ema = np.stack([np.zeros((L, E)) if s.ema is None else s.ema for s in seqs])
        if t == 1:
            ema = d * ema + (1 - d) * hot[:, 0]
        else:  # ema <- d^t ema + (1-d) sum_j d^(t-1-j) hot_j
            w = (1 - d) * d ** np.arange(t - 1, -1, -1)
            ema = d ** t * ema + np.stack([np.tensordot(w, h, axes=1) for h in hot])
        for s, row, routed, last in zip(seqs, ema, tok, last_ids):
            s.ema = row.copy()  # not a view: the step's array would live as long as any of its rows
            s.seen += t
            s.last_routes = routed[-1].copy()
            s.last_token = last
            s.scored = None


def sigmoid(x: np.ndarray) -> np.ndarray:
    """In x's precision; exp(-x) overflows for very negative x (below -88 in float32), whose probability is 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def union(per: np.ndarray) -> np.ndarray:
    """[B, L, E] per-sequence probabilities -> [L, E] the chance that at least one sequence picks each expert."""
    return 1.0 - np.prod(1.0 - np.clip(per, 0.0, 1.0), axis=0)
