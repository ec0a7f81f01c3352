"""ExpertFlowPlanner: the predictive, self-correcting expert cache (ExpertFlow's, with what it left as TODO).

Shapes: L MoE layers, E experts per layer, S slots, K top-k.

Before each step, from the predictor's scores (scores[l, e]: the chance that some token of the step picks expert e
of layer l), and after each offloaded layer's router, from the real route and the predictor's refined scores:

(a) quotas: each layer's share of the S slots follows the value of keeping its experts (below). Every layer
    keeps a floor of min(K, S // L) slots, one token's top-k where the budget allows it (when S < L*K, as at 10%
    of 12 x 64 with top-8, the floor is S // L). By default (`by_value`) the slots are shared by value itself: a
    miss or a prefetch of any layer takes the least valuable evictable expert of any layer above its floor
    (ExpertCache.order.share_by_value), and a prefetch only one worth less than a quarter of its own chance
    (`prefetch_margin`). Replaying moeflow-tiny's test trace at 25% this moved 1.49x Belady's bytes at batch 1
    and 1.21x at batch 8, against 1.60x and 1.24x with count quotas; told every route of this step and the next
    four, the same planner moves 1.12x with it and 1.27x without (tools/replay_oracle.py --by-value 1|0). The
    per-layer counts (`quota_mode` "value": a layer's share of the S most valuable experts; "demand": of the
    expected number of distinct experts) still bound each layer's prefetches, and with `by_value=False` they
    are the quotas a layer under its own takes slots back by, from the layers most over theirs. Counts are
    set once per step, before it; `requota=True` sets them again after every router too (a selection over all
    L*E values and a trim per router).
(b) eviction: the experts predicted for the step (score >= protect_at) are protected, and among the rest the
    least likely go first: the cache's priorities are the scores, coarsened to `levels` steps so that recency
    (LRU) still orders experts of about equal chance. A layer that has routed keeps, as its experts' priority,
    the share of the step's sequences that have used them lately (the predictor's route history), since they
    are needed again only at the next step.
(c) prefetch: at the start of the step, the likely experts (score >= prefetch_at) of the first `lookahead`
    layers are queued with their layer as deadline (earliest first, then by score), and `issue_now` of them
    start at once; as each layer routes, the layer `lookahead` ahead is queued and a bounded number more are
    issued, so copies overlap the compute of the layers before them while a demand miss waits behind few.
    Prefetches a layer no longer needs once it has routed are dropped; the last step's unissued ones too.
    With `cross_step`, once the last layer has routed, the first `lookahead` layers' likely experts of the step
    after (the predictor's next_scores, where it gives them) are queued and issued at once, so the copy engine
    works through the step's end (the last layer, sampling, the next prediction and plan) instead of idling.
(d) correction: when a layer routes, the predictor's refined scores re-plan the layers still to come: their
    queued prefetches are dropped and queued again from the refined scores, and their protection and
    priorities follow. With the model's gate ahead on (`MoEModel(gate_ahead=True)`), the next layer's guess
    from its own router on this layer's MoE input joins them (`ahead`: how many of the step's rows it gives
    each expert): an expert c rows name has that layer's chance 1 - (1 - a)^c, with a the share of the gate's
    guesses the layer's router has confirmed so far (0.8 until it has routed once), mixed into the refined
    score with weight `ahead_weight`.
(e) online adaptation lives in the predictor (LearnedPredictor(adapt=...)); the planner only reads its scores.
(f) rounds by value (`rounds` = n >= 1, off by default; with slots shared by value): a layer whose next load
    would evict an expert worth more than one it already holds, valued as after its use this step (its chance of
    use at later steps, discounted), is computed in rounds of at least n experts. The experts of a round, once
    computed, are the ones to evict for the rest, as Belady's rule would take them seeing the layer-step's
    experts one by one. A layer computed in one round cannot, which is why the bound issue 12 names sits 12-14%
    below what it can reach at batch 8 (tools/belady_bounds.py). Replaying moeflow-tiny's test trace with n = 1
    it moved 1.137x Belady's bytes at 25% batch 8 (1.222x without) and 1.274x at 10% batch 1 (1.391x), with
    7.5 and 2.3 rounds per layer-step; n = 8 keeps batch 8 to 2.1 rounds for 1.157x. Each round is one more
    expert kernel and makes the next round's copies wait for it: whether that pays is a GPU measurement.
    On an H100 (2026-12-06-h100-session12) the trained bench model's tokens once differed from the model's with
    it at 25%, batch 1: a round computes again the picks of experts kept from earlier rounds, but only the
    round's own slots were marked read, so a later round, which evicts those spent experts first, could refill one
    while the GPU still computed with it (tests/experts/test_round_reads.py). With every slot a round reads
    marked, the bench model's tokens are the model's own at 25% and 10%, batch 1 and 8, n = 1 and 8
    (2026-12-06-h100-session13), but rounds pay little there: n = 8 ran 1.04-1.08x the planner without rounds
    at batch 8 and 0.99-1.04x at batch 1, n = 1 0.88-0.95x.

Each part has its own switch, for ablation. Whatever is switched on, the router decides every token's experts:
the planner only chooses what is resident when, so outputs are identical with it or without it.
"""

from __future__ import annotations

import math

import numpy as np

from moeflow.experts.cache import ExpertCache
from moeflow.routing.predictors.base import Prediction


def _unpack(scores: np.ndarray | Prediction) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(scores, Prediction):
        nxt = getattr(scores, "next_scores", None)
        return np.asarray(scores.scores, dtype=np.float64), None if nxt is None else np.asarray(nxt, dtype=np.float64)
    return np.asarray(scores, dtype=np.float64), None


def _best(v: np.ndarray, n: int) -> np.ndarray:
    """Flat indices (in no set order) of the n highest of v, the ones the first n of a stable sort of -v would be
    (ties: the lower index first). A selection finds them in one pass over the step's L*E values; only when the
    n-th value ties with one left out (or is NaN) does the choice among equals need the stable sort."""
    neg = -v.ravel()
    if n >= neg.size:
        return np.arange(neg.size)
    order = np.argpartition(neg, n - 1)
    if np.count_nonzero(neg <= neg[order[n - 1]]) != n:
        return np.argsort(neg, kind="stable")[:n]
    return order[:n]


def _trim(counts: list[int], floor: int, excess: int) -> list[int]:
    """Take `excess` back from `counts`, one at a time from the count most above `floor` (the first of equals), in
    one pass: the largest come down to a common level t, and what is left is taken one each from the first of
    those at t."""
    if excess <= 0:
        return counts
    over = [n - floor for n in counts]
    top = sorted(over, reverse=True)
    acc = 0
    for k in range(1, len(top) + 1):  # the k largest, brought down to the next one, give at least `excess`
        acc += top[k - 1]
        if acc - k * (top[k] if k < len(top) else 0) >= excess:
            break
    t = -((excess - acc) // k)  # the lowest level the k largest can come down to: ceil((acc - excess) / k)
    left = excess - (acc - k * t)
    out = []
    for n, o in zip(counts, over):
        if o >= t:
            n -= o - t  # down to the common level
            if left:
                n, left = n - 1, left - 1
        out.append(n)
    return out


class ExpertFlowPlanner:
    name = "expertflow"

    def __init__(self, quotas: bool = True, protect: bool = True, prefetch: bool = True, correct: bool = True, *,
                 protect_at: float = 0.5, prefetch_at: float = 0.8, lookahead: int = 2, issue_now: int | None = None,
                 issue_per_layer: int | None = None, levels: int = 64, reuse_decay: float = 0.97,
                 reuse_weight: float = 0.5, by_value: bool = True, prefetch_margin: float = 0.25,
                 quota_mode: str = "value", requota: bool = False, cross_step: bool = False,
                 ahead_weight: float = 0.5, rounds: int = 0):
        self.quotas, self.protect, self.prefetch, self.correct = quotas, protect, prefetch, correct
        self.by_value, self.prefetch_margin = by_value, prefetch_margin
        self.reuse_decay, self.reuse_weight, self.quota_mode = reuse_decay, reuse_weight, quota_mode
        self.requota, self.cross_step = requota, cross_step
        self.ahead_weight = ahead_weight
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0 (0: off), got {rounds!r}")
        self.rounds = rounds
        self._ahead_precision: np.ndarray | None = None  # [L] the share of the gate ahead's guesses confirmed
        self._ahead_guess: tuple[int, np.ndarray] | None = None  # (layer, the experts the gate ahead named)
        self.protect_at, self.prefetch_at = protect_at, prefetch_at
        self.lookahead = max(1, lookahead)
        self.issue_now, self.issue_per_layer = issue_now, issue_per_layer
        self.levels = levels
        self._scores: np.ndarray | None = None  # [L, E] this step's scores, refined as layers route
        self._value: np.ndarray | None = None  # [L, E] value() as of the last plan or refine, kept row by row
        self._routed = -1  # the last layer that has routed this step
        self._queued_to = -1  # prefetches are queued for layers up to this one
        self._reuse: np.ndarray | None = None  # [L, E] moving average of the steps' routes: chance of use per step
        self._next: np.ndarray | None = None  # [L, E] the predictor's chance of use at the next step, if it gives one

    @property
    def uses_refined(self) -> bool:
        """Correction is the one part that reads the predictor's refined scores."""
        return self.correct

    uses_ahead = True  # refine() takes the model's gate-ahead counts for the next layer, when there are any

    @property
    def parts(self) -> dict[str, bool]:
        return {"quotas": self.quotas, "protect": self.protect, "prefetch": self.prefetch, "correct": self.correct}

    # -- before the step -----------------------------------------------------------------------

    def plan(self, cache: ExpertCache, scores: np.ndarray | Prediction) -> None:
        """scores [L, E]: the chance that the step uses each expert; or the Prediction itself, whose next_scores
        (when it has them) say which experts the step after will use."""
        scores, nxt = _unpack(scores)
        self._scores = scores.copy()
        self._next = nxt
        if self._reuse is None or self._reuse.shape != scores.shape:
            self._reuse = np.zeros_like(scores)
        self._routed, self._queued_to = -1, -1
        self._ahead_guess = None
        cache.drop_prefetches()  # the last step's unissued guesses are stale
        v = self._value = self.value()  # read by quotas and protection alike
        if self.quotas:
            cache.order.set_quotas(self.demand_quotas(cache, scores, v))
        floor = min(cache.top_k, cache.num_slots // len(cache.layers))  # one token's top-k, as the budget allows
        # slots shared by value needs the priorities protection sets
        by_value = self.quotas and self.by_value and self.protect
        cache.order.share_by_value(floor if by_value else None, self.prefetch_margin)
        self._guard(cache, v, 0)
        # rounds by value (slots shared by value only): what each expert is worth once its layer has computed it
        after = np.floor(self._later_value() * self.levels) / self.levels if self.rounds and by_value else None
        cache.order.set_after_use(after, max(1, self.rounds))
        if self.prefetch:
            self._queue(cache, 0, min(len(cache.layers), self.lookahead) - 1)
            if cache.transfer.num_queued:
                cache.issue_prefetches(self._issue_now(cache))

    def value(self, first: int = 0) -> np.ndarray:
        """[L, E] what keeping each expert is worth: its chance of use this step (layers not routed yet) or, failing
        that, at the next (the moving average of the routes, discounted). With `first`: rows first.. only."""
        w = self._later_value(first)
        v = 1.0 - (1.0 - self._scores[first:].clip(0.0, 1.0)) * (1.0 - w)
        done = self._routed + 1 - first
        if done > 0:
            v[:done] = w[:done]
        return v

    def _later_value(self, first: int = 0) -> np.ndarray:
        """[L - first, E] what keeping each expert is worth for the steps after this one: its chance of use at the
        next (the moving average of the routes, or the predictor's next_scores where higher), discounted."""
        later = self._reuse[first:] if self._next is None else np.maximum(self._reuse[first:], self._next[first:])
        return self.reuse_weight * later

    def demand_quotas(self, cache: ExpertCache, scores: np.ndarray, value: np.ndarray | None = None) -> np.ndarray:
        """Slots per layer: a floor each, the rest where keeping an expert is worth most (`value`: this
        step's self.value(), when the caller has it)."""
        L, E, S = len(cache.layers), cache.num_experts, cache.num_slots
        k = self._top_k(cache, scores)
        if self.quota_mode == "value":
            f = min(k, S // L)
            v = self.value() if value is None else value
            q = np.maximum(np.bincount(_best(v, S) // E, minlength=L), f).tolist()
            # the floors took more: trim the layers with most above their floor, the first of equals first
            return np.array(_trim(q, f, sum(q) - S), dtype=np.int64)
        floor = np.full(L, min(k, S // L), dtype=np.int64)
        demand = np.clip(scores.sum(axis=1), 1e-6, None)
        spare = S - int(floor.sum())
        want = floor + spare * demand / demand.sum()
        q = np.minimum(np.floor(want).astype(np.int64), E)
        # hand out what rounding and the E cap left, largest remainders first
        left = S - int(q.sum())
        order = np.argsort(-(want - q), kind="stable")
        for li in order:
            if left <= 0:
                break
            if q[li] < E:
                q[li] += 1
                left -= 1
        return q

    @staticmethod
    def _top_k(cache: ExpertCache, scores: np.ndarray) -> int:
        # one token's picks: the scores of a single sequence sum to about K per layer
        return max(1, int(round(float(np.minimum(scores, 1.0).sum(axis=1).min()))))

    def _issue_now(self, cache: ExpertCache) -> int:
        if self.issue_now is not None:
            return self.issue_now
        return max(2, math.ceil(self._scores[0].clip(0, 1).sum()))  # about one layer's worth

    # -- protection and eviction order -------------------------------------------------------------

    def _guard(self, cache: ExpertCache, value: np.ndarray, first: int) -> None:
        """Protection and priorities of layers first.. from the current scores: layers not routed yet by their
        chance of use this step, routed ones by their chance of reuse at the next (`value`, this step's
        self.value(), every row)."""
        if not self.protect:
            return
        mask = self._scores[first:] >= self.protect_at
        done = self._routed + 1 - first
        if done > 0:
            mask[:done] = False  # a routed layer is not needed again this step
        cache.order.protect(mask, first)
        cache.order.prioritize(np.floor(value[first:] * self.levels) / self.levels, first)

    # -- prefetch ------------------------------------------------------------------------------------

    def _queue(self, cache: ExpertCache, first: int, last: int, scores: np.ndarray | None = None) -> None:
        """Queue the likely, not yet resident experts of layers first..last (by ordinal), best first, by this
        step's scores (or `scores`: the next step's, queued across the step's end)."""
        for li in range(first, last + 1):
            s = (self._scores if scores is None else scores)[li]
            # the few likely ones not resident (nor on their way), then sorted: the same order as sorting all E
            # and keeping those
            order = ((s >= self.prefetch_at) & (cache.slot_of[li] < 0)).nonzero()[0]
            room = int(cache.order.quota[li])
            if len(order) and room > 0:
                order = order[np.argsort(-s[order], kind="stable")]
                cache.enqueue_prefetch(cache.layers[li], order[:room].tolist(), deadline=li,
                                       scores=s[order[:room]].tolist())
        if scores is None:
            self._queued_to = max(self._queued_to, last)

    # -- as each layer routes ---------------------------------------------------------------------------

    def _score_guess(self, layer: int, used_ids: np.ndarray) -> None:
        """The gate ahead's guess for `layer`, if it made one, against what the router chose: the layer's share
        of confirmed guesses moves a tenth of the way to this step's."""
        guess, self._ahead_guess = self._ahead_guess, None
        if guess is None or guess[0] != layer or not len(guess[1]):
            return
        hit = np.isin(guess[1], used_ids).mean()
        self._ahead_precision[layer] += 0.1 * (hit - self._ahead_precision[layer])

    def _merge_ahead(self, li: int, counts: np.ndarray) -> None:
        """Mix the gate ahead's chance for layer li into its scores (the class docstring's rule)."""
        if self._ahead_precision is None or len(self._ahead_precision) != self._scores.shape[0]:
            self._ahead_precision = np.full(self._scores.shape[0], 0.8)
        chance = 1.0 - (1.0 - self._ahead_precision[li]) ** counts
        w = self.ahead_weight
        self._scores[li] = (1.0 - w) * self._scores[li] + w * chance
        self._ahead_guess = (li, np.flatnonzero(counts > 0))

    def refine(self, cache: ExpertCache, layer: int, used: list[int], scores: np.ndarray | Prediction | None,
               ahead: np.ndarray | None = None) -> None:
        """MoE layer ordinal `layer` routed to `used`; scores: the predictor's refined [L, E] (or its Prediction);
        ahead [E]: the model's gate-ahead counts for layer + 1 (how many of the step's rows it gives each expert)."""
        if self._scores is None:
            return
        if isinstance(scores, Prediction):
            scores = scores.scores  # only its rows after `layer` are read: cast as they are copied
        L = len(cache.layers)
        # the rows this call can change: layers routed since the last call (this one, unless a layer went
        # unheard) and every later one (refined scores); the rows before keep their value, protection, priority
        first = min(self._routed + 1, layer)
        self._routed = layer
        used_ids = np.asarray(used, dtype=np.intp)
        # decay * reuse + (1 - decay) * (1 where used, else 0), in place: the same floats
        reuse = self._reuse[layer]
        reuse *= self.reuse_decay
        reuse[used_ids] += 1 - self.reuse_decay
        if self.correct and scores is not None:
            self._scores[layer + 1 :] = scores[layer + 1 :]
        self._score_guess(layer, used_ids)
        if ahead is not None and self.correct and layer + 1 < L:
            self._merge_ahead(layer + 1, np.asarray(ahead))
        self._scores[layer] = 0.0
        self._scores[layer, used_ids] = 1.0
        replanned = self.correct and (scores is not None or (ahead is not None and layer + 1 < L))
        if self.prefetch:
            cache.drop_prefetches(cache.layers[layer])  # guesses for this layer the router did not take
            if replanned:
                # the queued layers: drop the guesses the refined scores no longer back, queue the new ones
                queued: dict[int, list[int]] = {}
                for slot in cache.transfer.queued_slots():
                    owner = cache.owner[slot]
                    if owner is not None:
                        queued.setdefault(cache.ordinal(owner[0]), []).append(owner[1])
                for li in range(layer + 1, min(self._queued_to, L - 1) + 1):
                    stale = [e for e in queued.get(li, []) if self._scores[li, e] < self.prefetch_at]
                    if stale:
                        cache.drop_prefetches(cache.layers[li], stale)
                if self._queued_to > layer:
                    self._queue(cache, layer + 1, self._queued_to)
        v = self._value
        v[first:] = self.value(first)
        if self.quotas and self.requota:
            cache.order.set_quotas(self.demand_quotas(cache, self._scores, v))
        self._guard(cache, v, first)
        if self.prefetch:
            last = min(L - 1, layer + self.lookahead)
            if last > self._queued_to:
                self._queue(cache, self._queued_to + 1, last)
            if layer == L - 1 and self.cross_step and self._next is not None:
                self._queue(cache, 0, min(L, self.lookahead) - 1, self._next)
                cache.issue_prefetches()  # nothing of this step is left to wait behind them
            elif cache.transfer.num_queued:
                n = self.issue_per_layer
                if n is None:
                    n = max(2, math.ceil(self._scores[min(L - 1, layer + 1)].clip(0, 1).sum()))
                cache.issue_prefetches(n)
