"""The learned predictor at run time: it tracks requests and refines as layers route, scores a sequence once per
state and alike in any batch, learns each sequence's routes and calibrates itself from them, and replays its
forward from CUDA graphs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moeflow.assets import default_model_dir
from moeflow.routing.predictors import LearnedPredictor, RequestView, StepView, load_predictor
from moeflow.routing.predictors.learned import union
from moeflow.routing.record import StepRoutes
from moeflow.weights.checkpoint import Checkpoint

SHIPPED = default_model_dir() / "predictor"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> Checkpoint:
    return Checkpoint(default_model_dir())


def test_runtime_predictor_tracks_requests_and_refines(tiny):
    pred = load_predictor(SHIPPED, tiny)
    assert isinstance(pred, LearnedPredictor)
    L, E, K = 8, 32, 4
    prompts = {"a": (0, 464, 3290, 318), "b": (0, 1000)}
    for rid, ids in prompts.items():
        pred.admitted(RequestView(rid, ids))
    view = StepView(0, True, ("a", "b"), tuple(prompts.values()), (4, 2))
    pre = pred.predict(view)
    assert pre.scores.shape == (L, E) and pre.per_request.shape == (2, L, E)
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(6)]) for _ in range(L)])  # [L, 6, K]
    used = np.zeros((L, E), dtype=bool)
    np.put_along_axis(used, ids.reshape(L, -1), True, axis=1)
    pred.observe(view, StepRoutes(ids, ids, used, [slice(0, 4), slice(4, 6)]))
    step = StepView(1, False, ("a",), ((286,),), (5,))
    p = pred.predict(step)
    assert p.per_request.shape == (1, L, E) and p.confidence.shape == (L,)
    assert np.allclose(p.scores, p.per_request[0], atol=1e-6), "one sequence: the union is its own chance"
    picks = p.per_request.sum(-1)  # expected experts per layer; the history here is random routes, so loosely
    assert ((picks > K / 2) & (picks < 2 * K)).all(), f"about K picks per layer: {picks}"
    assert p.next_scores.shape == (L, E)
    route = [int(e) for e in np.argsort(-p.scores[0])[:K]]
    r = pred.refine(step, 0, [route])
    assert set(np.flatnonzero(r.scores[0] > 0.99)) == set(route), "a routed layer's scores are its route"
    assert not np.allclose(r.scores[1], p.scores[1]), "the next layer is sharpened"
    assert np.allclose(r.scores[2:], p.scores[2:])
    r2 = pred.refine(step, 1, [route, [int(e) for e in np.argsort(-r.scores[1])[:K]]])
    per = pred._step[3]
    assert np.array_equal(r2.scores, union(per).astype(np.float32)), "the rows kept in place are the whole union's"
    pred.finished("a")
    pred.finished("b")
    assert not pred._seqs


def test_a_batch_predicts_for_each_sequence_what_it_predicts_for_it_alone(tiny):
    """Decode rows are gathered from every sequence's state at once (a route-aware scheduler scores all the running
    ones each step): a sequence's row must not depend on the others in the batch, nor on their order. Sequences
    with and without a history and last routes are mixed."""
    pred = load_predictor(SHIPPED, tiny, adapt=False)
    L, E, K = 8, 32, 4
    rng = np.random.default_rng(1)
    rids = [f"r{i}" for i in range(7)]
    for rid in rids:
        pred.admitted(RequestView(rid, (0, 5)))
    for index, fed in enumerate((rids[:5], rids[2:6])):  # r6 is never observed, r0 and r1 only once
        ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in fed]) for _ in range(L)])
        used = np.zeros((L, E), dtype=bool)
        np.put_along_axis(used, ids.reshape(L, -1), True, axis=1)
        view = StepView(index, False, tuple(fed), tuple((int(t),) for t in rng.integers(1, 2000, len(fed))),
                        tuple([3] * len(fed)))
        pred.observe(view, StepRoutes(ids, ids, used, [slice(i, i + 1) for i in range(len(fed))]))
    tokens = {rid: int(t) for rid, t in zip(rids, rng.integers(1, 2000, len(rids)))}

    def rows(order):
        for state in pred._seqs.values():
            state.scored = None  # score every row afresh, in this batch (test_a_sequence_is_scored_once_per_state)
        view = StepView(9, False, tuple(order), tuple((tokens[r],) for r in order), tuple([4] * len(order)))
        return dict(zip(order, pred.predict(view).per_request))

    together = rows(rids[::-1])
    for rid in rids:
        np.testing.assert_allclose(together[rid], rows([rid])[rid], rtol=0, atol=1e-5)
    assert not np.allclose(together["r6"], together["r3"], atol=1e-3), "histories make the rows differ"


def test_a_sequence_is_scored_once_per_state(tiny):
    """A route-aware scheduler scores every running sequence before a step, and the step then predicts for the
    ones it runs: the network runs once for each sequence's state and fed token, whoever asks, and a sequence
    is scored again once the step's routes are observed or it feeds another token. Reused rows give what a
    fresh forward gives."""
    L, E, K = 8, 32, 4
    pred, fresh = load_predictor(SHIPPED, tiny), load_predictor(SHIPPED, tiny)
    rows_run = []
    forward = pred.logits
    pred.logits = lambda cur, *rest: rows_run.append(len(cur)) or forward(cur, *rest)
    rids = [f"r{i}" for i in range(6)]
    rng = np.random.default_rng(2)
    tokens = {rid: int(t) for rid, t in zip(rids, rng.integers(1, 2000, len(rids)))}

    def view(index, order):
        return StepView(index, False, tuple(order), tuple((tokens[r],) for r in order), tuple([4] * len(order)))

    def observe(index, order):
        ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in order]) for _ in range(L)])
        used = np.zeros((L, E), dtype=bool)
        np.put_along_axis(used, ids.reshape(L, -1), True, axis=1)
        routes = StepRoutes(ids, ids, used, [slice(i, i + 1) for i in range(len(order))])
        for p in (pred, fresh):
            p.observe(view(index, order), routes)

    for p in (pred, fresh):
        for rid in rids:
            p.admitted(RequestView(rid, (0, 5)))
    observe(0, rids)
    scored = pred.per_request(view(1, rids))  # the scheduler scores all six, as Forecast.running_predictions does
    assert pred._step is None, "scoring for a scheduler leaves the step's forecast alone"
    np.testing.assert_allclose(scored, fresh.predict(view(1, rids)).per_request, rtol=0, atol=1e-6)
    chosen = ["r4", "r1", "r2"]
    step = pred.predict(view(1, chosen))
    assert rows_run == [6], "the step's rows were scored before it"
    expect = fresh.predict(view(1, chosen))
    for got, want in ((step.scores, expect.scores), (step.per_request, expect.per_request),
                      (step.next_scores, expect.next_scores)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    observe(1, chosen)
    tokens["r5"] += 1  # r5 feeds another token without being observed
    pred.predict(view(2, rids))
    assert rows_run == [6, 4], "only the observed sequences and the one feeding another token run again"
    np.testing.assert_allclose(pred.predict(view(2, rids)).per_request, fresh.predict(view(2, rids)).per_request,
                               rtol=0, atol=1e-6)
    assert rows_run == [6, 4]


def test_observe_moves_each_sequence_on_by_its_own_tokens(tiny):
    """A prefill (prompts of several lengths) and decode steps (subsets of the sequences, learned all at once):
    each sequence's route history follows ema <- d ema + (1 - d) multi-hot route, token by token, and its last
    routes, last token and token count are its own."""
    pred = load_predictor(SHIPPED, tiny)
    L, E, K = 8, 32, 4
    d = pred.cfg.hist_decay
    rng = np.random.default_rng(3)
    rids = [f"r{i}" for i in range(5)]
    want = {rid: np.zeros((L, E)) for rid in rids}
    seen = dict.fromkeys(rids, 0)

    def step(index, order, lengths):
        fed = tuple(tuple(int(t) for t in rng.integers(1, 2000, n)) for n in lengths)
        ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(sum(lengths))]) for _ in range(L)])
        used = np.zeros((L, E), dtype=bool)
        np.put_along_axis(used, ids.reshape(L, -1), True, axis=1)
        starts = np.cumsum([0, *lengths])
        rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        view = StepView(index, max(lengths) > 1, tuple(order), fed, tuple(lengths))
        pred.predict(view)
        pred.observe(view, StepRoutes(ids, ids, used, rows))
        for rid, r, tokens in zip(order, rows, fed):
            for j in range(r.start, r.stop):
                hot = np.zeros((L, E))
                hot[np.arange(L)[:, None], ids[:, j]] = 1.0
                want[rid] = d * want[rid] + (1 - d) * hot
            seen[rid] += r.stop - r.start
            state = pred._seqs[rid]
            assert state.last_token == tokens[-1] and state.seen == seen[rid]
            assert np.array_equal(state.last_routes, ids[:, r.stop - 1])

    for rid in rids:
        pred.admitted(RequestView(rid, (0,)))
    step(0, rids, [3, 1, 6, 2, 4])
    step(1, rids, [1] * 5)
    step(2, ["r3", "r0"], [1, 1])
    step(3, ["r4", "r1", "r3"], [1, 1, 1])
    for rid in rids:
        np.testing.assert_allclose(pred._seqs[rid].ema, want[rid], rtol=1e-12, atol=1e-15)
    a, b = pred._seqs["r0"].ema, pred._seqs["r3"].ema
    assert not np.shares_memory(a, b), "each sequence owns its history"


def test_calibration_moves_by_the_log_loss_of_each_forecaster():
    """OnlineCalibration.update against the log-loss written out (both logs of every entry)."""
    from moeflow.routing.predictors.learned import OnlineCalibration, sigmoid

    rng = np.random.default_rng(4)
    B, L, E, K = 6, 5, 16, 2
    cal = OnlineCalibration(L, K)
    bias, theta = cal.bias.copy(), cal.theta.copy()
    for _ in range(3):
        logits, hist = rng.normal(size=(B, L, E)), rng.random((B, L, E))
        actual = np.zeros((B, L, E))
        np.put_along_axis(actual, np.argsort(rng.random((B, L, E)), -1)[..., :K], 1.0, axis=-1)
        p = np.clip(sigmoid(logits + bias[None, :, None]), 1e-4, 1 - 1e-4)
        h = np.clip(hist, 0.02, 0.98)
        bias = np.clip(bias + cal.rate * (actual.sum(-1) - p.sum(-1)).mean(0) / K, -2.0, 2.0)
        def loss(q):
            return -(actual * np.log(q) + (1 - actual) * np.log(1 - q)).sum(-1).mean(0) / K
        theta = np.clip(theta + cal.mix_rate * (loss(p) - loss(h)), -8.0, cal.max_theta)
        cal.update(logits, hist, actual)
        np.testing.assert_allclose(cal.bias, bias, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cal.theta, theta, rtol=0, atol=1e-12)
    assert not np.allclose(cal.theta, -3.0), "the mixing weights moved"


def test_calibration_applies_in_the_logits_precision():
    """OnlineCalibration.apply against its formula, (1 - m) sigmoid(z + bias) + m min(h, 1): float64 logits to
    float64's rounding, the network's float32 ones in float32 to float32's; logits far below zero give 0 quietly."""
    from moeflow.routing.predictors.learned import OnlineCalibration

    rng = np.random.default_rng(5)
    B, L, E, K = 7, 4, 16, 2
    cal = OnlineCalibration(L, K)
    cal.bias, cal.theta = rng.normal(scale=0.5, size=L), rng.normal(-1.0, 0.5, size=L)
    logits, hist = rng.normal(scale=3.0, size=(B, L, E)), rng.random((B, L, E)) * 1.5
    logits[0, 0, :3] = -1e4
    m = (1.0 / (1.0 + np.exp(-cal.theta)))[None, :, None]
    with np.errstate(over="ignore"):
        want = (1 - m) / (1 + np.exp(-(logits + cal.bias[None, :, None]))) + m * np.minimum(hist, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning escapes
        got64 = cal.apply(logits, hist)
        got32 = cal.apply(logits.astype(np.float32), hist.astype(np.float32))
    assert got64.dtype == np.float64 and got32.dtype == np.float32
    np.testing.assert_allclose(got64, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got32[0, 0, :3], (m * np.minimum(hist, 1.0))[0, 0, :3], rtol=1e-6)  # sigmoid: 0


def test_the_forward_stays_eager_off_cuda(tiny):
    pred = load_predictor(SHIPPED, tiny)
    pred.capture_graphs((1, 2, 4))
    assert pred._graphed is None, "no graphs on the CPU"


@pytest.mark.gpu
def test_gpu_graphed_forward_equals_the_eager_one(tiny):
    """The forward replayed from a CUDA graph (padded to its bucket) gives the eager forward's logits, for each
    bucket, for fresh features on every call, and a forward of more rows than the largest bucket stays eager."""
    pred = load_predictor(SHIPPED, tiny, "cuda")
    L, E = pred.L, pred.E
    rng = np.random.default_rng(0)

    def features(n: int):
        cur = rng.integers(0, 8192, n).tolist()
        prev = [-1] + rng.integers(0, 8192, n - 1).tolist()
        last = (rng.random((n, L * E)) < 0.12).astype(np.float32)
        hist = rng.random((n, L * E)).astype(np.float32) * last
        return cur, prev, last, hist

    cases = [features(n) for n in (1, 2, 3, 4, 1, 7)]
    eager = [pred.logits(*f) for f in cases]
    pred.capture_graphs((1, 2, 4))
    assert pred._graphed is not None and not pred._graphed.fits(7)
    for f, want in zip(cases, eager):
        got = pred.logits(*f)
        assert got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4), float(np.abs(got - want).max())
