"""The learned routing-path predictor: it learns from a short trace, refuses another model, finds its way to a
model directory, and the shipped one meets its bounds on committed held-out text."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.assets import default_model_dir
from moeflow.errors import ConfigError
from moeflow.routing.predictors import LearnedPredictor, RequestView, StepView, find_predictor, load_predictor
from moeflow.evaluation.predictors import best_baseline, learned_scorer, score, score_baselines
from moeflow.routing.predictors.learned import union
from moeflow.routing.predictors.net import PredictorFiles
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.predictors.training import TrainOptions, train
from moeflow.routing.record import StepRoutes
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint

HELDOUT = Path(__file__).parents[1] / "data" / "heldout"
SHIPPED = default_model_dir() / "predictor"
# Bound written in the issue; the shipped predictor measures 1.49x Belady on this trace (LRU: 1.80x; 1.59x before
# slots were shared by value), so the test is an expected failure until the cache gets there (see the predictor's
# README for the figures).
BYTES_VS_BELADY = 1.25
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def heldout_jsonl(out: Path, docs_per_domain: int) -> Path:
    """The first documents of each committed held-out domain, the domains taken in turn."""
    per = {p.stem: p.read_text().splitlines()[:docs_per_domain] for p in sorted(HELDOUT.glob("*.jsonl"))}
    lines = [per[d][i] for i in range(docs_per_domain) for d in per if i < len(per[d])]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def heldout_trace(tmp_path_factory) -> Trace:
    """A trace of the bundled model over committed held-out text (every domain), made with `moeflow trace`."""
    from moeflow.cli import main

    tmp = tmp_path_factory.mktemp("heldout-trace")
    data = heldout_jsonl(tmp / "docs.jsonl", 40)
    out = tmp / "trace.npz"
    assert main(["trace", "--data", str(data), "--out", str(out), "--device", "cpu", "--max-tokens", "6000",
                 "--max-seq-len", "128", "--batch-size", "16"]) == 0
    return Trace.load(out)


@pytest.fixture(scope="module")
def tiny() -> Checkpoint:
    return Checkpoint(default_model_dir())


def split(trace: Trace, share: float) -> tuple[RouteData, RouteData]:
    """Whole sequences: the first `share` of them, and the rest."""
    data = RouteData.from_traces([trace])
    slices = data.sequence_slices()
    cut = slices[int(len(slices) * share)].start
    return data.select(np.arange(cut)), data.select(np.arange(cut, data.num_tokens))


def trace_of(data: RouteData, like: Trace) -> Trace:
    """A RouteData back as a Trace (for train(), which reads traces)."""
    n = data.num_tokens
    L, K, E = data.num_layers, data.top_k, data.num_experts
    seq = np.cumsum(data.starts) - 1
    pos = np.arange(n) - np.maximum.accumulate(np.where(data.starts, np.arange(n), 0))
    doms = np.array([data.domains[data.starts][s] for s in range(seq[-1] + 1)], dtype=np.int16)
    return Trace(data.token_ids.astype(np.int32), pos.astype(np.int32), seq.astype(np.int32), data.routes,
                 np.zeros((n, L, K), np.float16), np.zeros((n, L, E), np.float16), doms,
                 np.array([f"d{s}" for s in range(seq[-1] + 1)]), np.array(data.domain_names), like.moe_layers, {})


def test_training_on_a_short_trace_beats_every_baseline_on_held_out_sequences(heldout_trace, tiny):
    fit, held = split(heldout_trace, 0.7)
    torch.manual_seed(0)
    files, log = train(tiny, [trace_of(fit, heldout_trace)], TrainOptions(epochs=10, batch_size=256, lr=5e-3,
                                                                            val_fraction=0.0), progress=False)
    learned = score(learned_scorer(files, tiny, held), held, [1, 8])
    baselines = score_baselines(fit, held, [1, 8])
    name, best = best_baseline(baselines)
    assert learned["recall"] > best + 0.05, (learned["recall"], name, best)
    assert learned["union_recall"]["8"] > max(b["union_recall"]["8"] for b in baselines.values())
    assert learned["recall_at_2k"] > learned["recall"]
    losses = [s["loss"] for s in log["steps"]]
    assert losses[-1] < losses[0]


def test_a_predictor_trained_for_another_model_is_refused(tiny, checkpoint):
    other = Checkpoint(checkpoint("qwen3_moe", "fused"))
    with pytest.raises(ConfigError, match="trained for model 'moeflow-tiny'"):
        load_predictor(SHIPPED, other)

    class Retrained:
        """The bundled model with one router weight changed: same shapes, another model."""

        def __init__(self, base):
            self.spec, self.layouts, self.dir = base.spec, base.layouts, base.dir
            self.tensor_dtype, self.dense_numel, self._base = base.tensor_dtype, base.dense_numel, base

        def tensor(self, name):
            t = self._base.tensor(name)
            return t + 1 if name.endswith("layers.3.mlp.gate.weight") else t

    with pytest.raises(ConfigError, match="fingerprint"):
        load_predictor(SHIPPED, Retrained(tiny))


def test_find_predictor_looks_inside_then_beside_the_model(tmp_path):
    assert find_predictor(default_model_dir()) == SHIPPED
    model = tmp_path / "m"
    model.mkdir()
    assert find_predictor(model) is None
    beside = tmp_path / "m-predictor"
    shutil.copytree(SHIPPED, beside)
    assert find_predictor(model) == beside
    shutil.copytree(SHIPPED, model / "predictor")
    assert find_predictor(model) == model / "predictor"


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


def test_cli_trains_and_evaluates(heldout_trace, tmp_path, capsys):
    from moeflow.cli import main

    path = tmp_path / "t.npz"
    heldout_trace.save(path)
    out = tmp_path / "pred"
    assert main(["predictor", "train", str(default_model_dir()), "--traces", str(path), "--out", str(out),
                 "--epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bytes"] <= 2 * 2**20
    for name in ("predictor.safetensors", "config.json", "training_log.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert main(["predictor", "eval", str(out), "--trace", str(path), "--budgets", "25%", "--batch-sizes", "1,4",
                 "--replay-tokens", "150", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"recall", "baselines", "cache"} <= set(report)
    assert set(report["baselines"]) == {"frequency", "token", "previous", "layer"}
    assert {(c["batch"], c["policy"]) for c in report["cache"]} == {(b, p) for b in (1, 4)
                                                                     for p in ("lru", "predictive", "belady")}
    assert all(0 <= c["hit_rate"] <= 1 and c["bytes_per_token"] >= 0 for c in report["cache"])
    assert report["recall"]["union_recall"]["1"] == pytest.approx(report["recall"]["recall"])
    # the trace carries the gate ahead's guesses (moeflow trace records them): one more policy, by name
    assert main(["predictor", "eval", str(out), "--trace", str(path), "--budgets", "25%", "--batch-sizes", "1",
                 "--replay-tokens", "150", "--gate-ahead", "--domains", "wiki_en", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["policy"] for c in report["cache"]] == ["lru", "predictive", "belady", "gate-ahead"]
    bare = tmp_path / "bare.npz"
    dataclasses.replace(heldout_trace, ahead_ids=None).save(bare)
    assert main(["predictor", "eval", str(out), "--trace", str(bare), "--gate-ahead"]) != 0
    assert "no gate-ahead guesses" in capsys.readouterr().err


# -- the shipped predictor --------------------------------------------------------------------------------


def test_shipped_predictor_is_small_and_for_the_bundled_model(tiny):
    size = sum(f.stat().st_size for f in SHIPPED.iterdir() if f.suffix in (".safetensors", ".json"))
    assert size <= 2 * 2**20
    assert (SHIPPED / "predictor.safetensors").stat().st_size <= 0.02 * sum(
        f.stat().st_size for f in default_model_dir().glob("*.safetensors"))
    files = PredictorFiles.load(SHIPPED)
    assert files.model["model"] == "moeflow-tiny"
    load_predictor(SHIPPED, tiny)  # the fingerprint matches


def test_shipped_predictor_recall_on_heldout_text(heldout_trace, tiny):
    data = RouteData.from_traces([heldout_trace])
    learned = score(learned_scorer(PredictorFiles.load(SHIPPED), tiny, data), data, [8])
    assert learned["recall"] >= 0.70, learned["recall"]


@pytest.fixture(scope="module")
def replay_25(heldout_trace, tiny) -> dict:
    from moeflow.evaluation.predictors import replay_cache

    data = RouteData.from_traces([heldout_trace])
    return {r["policy"]: r for r in replay_cache(SHIPPED, tiny, data, ["25%"], [1], max_tokens=800)}


def test_shipped_predictor_moves_fewer_bytes_than_lru_at_25_percent_batch_1(replay_25):
    assert replay_25["predictive"]["bytes_per_token"] < replay_25["lru"]["bytes_per_token"]
    assert replay_25["predictive"]["hit_rate"] > replay_25["lru"]["hit_rate"] + 0.2


@pytest.mark.xfail(strict=True, reason="measured 1.49x Belady's bytes at 25%, batch 1 (LRU 1.80x): the bound is "
                                       "not met yet")
def test_shipped_predictor_bytes_against_belady_at_25_percent_batch_1(replay_25):
    ratio = replay_25["predictive"]["bytes_per_token"] / replay_25["belady"]["bytes_per_token"]
    assert ratio <= BYTES_VS_BELADY, f"{ratio:.2f}x Belady"


def test_the_look_ahead_head_learns_the_experts_of_the_next_horizon_tokens_of_the_same_sequence():
    """--horizon H: the second head's target is every expert any of the next H tokens of the sequence uses; a
    token with no next token in its sequence is masked out."""
    from moeflow.routing.predictors.training import _DeviceData

    routes = np.array([[[0]], [[1]], [[2]], [[3]], [[0]]], dtype=np.int16)  # [N, L=1, K=1]: two sequences, 3 + 2
    data = RouteData(np.arange(5), np.array([-1, 0, 1, -1, 3]), routes, np.array([True, False, False, True, False]),
                     np.array([0, 0, 0, 1, 1]), np.zeros(5, dtype=np.int64), ["d"], 4)
    emb = torch.zeros(8, 4)
    rows = torch.arange(5)
    for horizon, want in ((1, [{1}, {2}, set(), {0}, set()]), (2, [{1, 2}, {2}, set(), {0}, set()])):
        *_, y_next, has_next = _DeviceData(data, emb, 0.9, torch.device("cpu"), horizon).batch(rows)
        got = [set(np.flatnonzero(y_next[i, 0].numpy()).tolist()) for i in range(5)]
        assert got == want, f"horizon {horizon}"
        assert has_next.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="horizon must be at least 1"):
        train(Checkpoint(default_model_dir()), [], TrainOptions(horizon=0), torch.device("cpu"))



def test_first_sequences_stop_at_the_sequence_that_reaches_the_token_count():
    routes = np.zeros((7, 1, 1), dtype=np.int16)
    starts = np.array([True, False, False, True, False, True, False])  # sequences of 3, 2 and 2 tokens
    data = RouteData(np.arange(7), np.full(7, -1), routes, starts, np.zeros(7, dtype=np.int64),
                     np.zeros(7, dtype=np.int64), ["d"], 4)
    assert data.first_sequences(None) == data.sequence_slices()
    assert data.first_sequences(1) == [slice(0, 3)], "a sequence is never cut"
    assert data.first_sequences(3) == [slice(0, 3)]
    assert data.first_sequences(4) == [slice(0, 3), slice(3, 5)]
    assert data.first_sequences(100) == data.sequence_slices()


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


def test_rounds_by_value_move_fewer_bytes_at_batch_8(heldout_trace, tiny):
    """The planner's rounds by value (ExpertFlowPlanner(rounds=1)) on the bundled model's held-out trace at 25%,
    batch 8: a layer computed in rounds lets its own computed experts go first, as Belady's rule seeing them one by
    one would (measured here: 1.234x -> 1.148x Belady's bytes, 7% fewer)."""
    from moeflow.experts.predictive import ExpertFlowPlanner
    from moeflow.experts.replay import belady, decode_steps, make_cache, pool_at, replay
    from moeflow.routing.predictors.learned import load_predictor

    data = RouteData.from_traces([heldout_trace])
    spec = tiny.spec
    slots, eb = pool_at(tiny, "25%")
    steps = decode_steps(data.token_ids, data.routes, data.first_sequences(1500), 8, spec.num_experts)
    moved = {n: replay(steps, make_cache(spec, slots, eb), load_predictor(SHIPPED, tiny),
                       ExpertFlowPlanner(rounds=n)).bytes_per_token for n in (0, 1)}
    floor = belady(steps, slots, eb, spec.moe_layers).bytes_per_token
    print({n: round(b / floor, 3) for n, b in moved.items()})
    assert moved[1] <= 0.96 * moved[0] and moved[1] >= floor


def test_the_default_width_is_the_widest_within_the_share_up_to_the_cap():
    """size_net: no width asked, the widest multiple of 16 whose float16 weights fit the budget, at most MAX_WIDTH
    (the bench shape's 2% would allow far more); a width asked for that does not fit is refused."""
    from types import SimpleNamespace

    from moeflow.routing.predictors.training import MAX_WIDTH, size_net

    bench = SimpleNamespace(num_moe_layers=12, num_experts=64, router=SimpleNamespace(top_k=8), hidden_size=2048)
    assert size_net(bench, 10**12, None, 0.9, horizon=2).hidden == MAX_WIDTH == 1024
    wide = size_net(bench, 10**12, None, 0.9, horizon=2)
    budget = 2 * wide.num_params() - 1  # one byte short of the widest
    narrower = size_net(bench, budget, None, 0.9, horizon=2)
    assert narrower.hidden == MAX_WIDTH - 16 and 2 * narrower.num_params() <= budget
    assert size_net(bench, 10**12, 2048, 0.9, horizon=2).hidden == 2048, "a width asked for is kept when it fits"
    with pytest.raises(ConfigError, match="hidden width 2048 needs"):
        size_net(bench, budget, 2048, 0.9, horizon=2)
