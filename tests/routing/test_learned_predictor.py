"""The learned routing-path predictor's training and files: it learns from a short trace, refuses another model, finds
its way to a model directory, and the shipped one meets its bounds on committed held-out text (its run-time
behaviour: test_learned_runtime.py)."""

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
from moeflow.routing.predictors import find_predictor, load_predictor
from moeflow.evaluation.predictors import best_baseline, learned_scorer, score, score_baselines
from moeflow.routing.predictors.net import PredictorFiles
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.predictors.training import TrainOptions, train
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
