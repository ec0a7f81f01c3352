"""The predictor's router lens (routing/predictors/net.py): each MoE router's view of the token alone, read from the
model the predictor is bound to, never saved with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.assets import default_model_dir
from moeflow.errors import ConfigError
from moeflow.models.layers import rms_norm
from moeflow.routing.predictors import load_predictor
from moeflow.routing.predictors.net import NetConfig, PredictorFiles, RouteNet, normalized_embedding, router_weight_name
from moeflow.routing.predictors.training import TrainOptions, train
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> Checkpoint:
    return Checkpoint(default_model_dir())


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory) -> Trace:
    """`moeflow trace` of the bundled model over the first committed held-out documents of each domain."""
    from moeflow.cli import main

    heldout = Path(__file__).parents[1] / "data" / "heldout"
    lines = [line for p in sorted(heldout.glob("*.jsonl")) for line in p.read_text().splitlines()[:6]]
    tmp = tmp_path_factory.mktemp("lens-trace")
    (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["trace", "--data", str(tmp / "docs.jsonl"), "--out", str(tmp / "trace.npz"), "--device", "cpu",
                 "--max-tokens", "1500", "--max-seq-len", "96", "--batch-size", "16"]) == 0
    return Trace.load(tmp / "trace.npz")


def test_the_lens_is_each_router_on_the_tokens_normalised_embedding(tiny):
    spec = tiny.spec
    L, E = spec.num_moe_layers, spec.num_experts
    net = RouteNet(NetConfig(L, E, spec.router.top_k, spec.hidden_size, lens_width=8)).attach_lens(tiny)
    emb = tiny.tensor("model.embed_tokens.weight").float()
    ids = torch.tensor([0, 5, 300, spec.vocab_size - 1])
    got = (normalized_embedding(emb, ids) @ net.lens_basis).view(len(ids), L, E)
    for li, layer in enumerate(spec.moe_layers):
        norm = tiny.tensor(f"model.layers.{layer}.post_attention_layernorm.weight").float()
        want = rms_norm(emb[ids], norm, 1e-6) @ tiny.tensor(router_weight_name(tiny, layer)).float().T
        torch.testing.assert_close(got[:, li], want, rtol=1e-4, atol=1e-4)


def test_a_predictor_with_the_lens_trains_saves_and_loads_bound_to_its_model(small_trace, tiny, tmp_path):
    torch.manual_seed(0)
    files, log = train(tiny, [small_trace], TrainOptions(epochs=2, batch_size=256, val_fraction=0.0,
                                                          lens_width=16), progress=False)
    assert files.net.cfg.lens_width == 16 and log["net"]["lens_width"] == 16
    files.save(tmp_path / "pred")
    saved = PredictorFiles.load(tmp_path / "pred")
    assert not any("lens_basis" in k for k in saved.net.state_dict()), "A is the model's, not saved"
    L, E = files.net.cfg.num_layers, files.net.cfg.num_experts
    emb = tiny.tensor("model.embed_tokens.weight")
    cur, prev = normalized_embedding(emb, torch.tensor([7, 42])), normalized_embedding(emb, torch.tensor([-1, 7]))
    dense = torch.zeros(2, L * E)
    with pytest.raises(RuntimeError, match="attach_lens"):
        saved.net(cur, prev, dense, dense)
    pred = load_predictor(tmp_path / "pred", tiny)  # binds it to the model it was checked against
    rng = np.random.default_rng(0)
    last = (rng.random((2, L * E)) < 0.1).astype(np.float32)
    hist = last * 0.5
    want = files.net.eval()(cur, prev, torch.from_numpy(last), torch.from_numpy(hist)).detach().numpy()
    got = pred.logits([7, 42], [-1, 7], last, hist)
    assert np.allclose(got, want, atol=2e-2), float(np.abs(got - want).max())  # saved in float16


@pytest.mark.parametrize("width", [-1, 1.5, True])
def test_a_bad_lens_or_embedding_width_is_refused(small_trace, tiny, width):
    with pytest.raises(ConfigError, match="router lens's width"):
        train(tiny, [small_trace], TrainOptions(epochs=1, lens_width=width), progress=False)
    with pytest.raises(ConfigError, match="embedding's projection"):
        train(tiny, [small_trace], TrainOptions(epochs=1, cur_width=0 if width == -1 else width), progress=False)


def test_the_cli_passes_the_lens_and_embedding_widths(small_trace, tiny, tmp_path):
    from moeflow.cli import main

    small_trace_path = tmp_path / "trace.npz"
    small_trace.save(small_trace_path)
    assert main(["predictor", "train", str(default_model_dir()), "--traces", str(small_trace_path), "--out",
                 str(tmp_path / "pred"), "--device", "cpu", "--epochs", "1", "--lens-width", "8", "--cur-width",
                 "24", "--no-progress"]) == 0
    cfg = PredictorFiles.load(tmp_path / "pred").net.cfg
    assert (cfg.lens_width, cfg.cur_width) == (8, 24)


@pytest.mark.gpu
def test_gpu_graphed_forward_with_the_lens_equals_the_eager_one(small_trace, tiny, tmp_path):
    torch.manual_seed(0)
    files, _ = train(tiny, [small_trace], TrainOptions(epochs=1, batch_size=256, val_fraction=0.0, lens_width=16),
                     progress=False)
    files.save(tmp_path / "pred")
    pred = load_predictor(tmp_path / "pred", tiny, "cuda")
    L, E = pred.L, pred.E
    rng = np.random.default_rng(0)
    cases = []
    for n in (1, 3, 4):
        last = (rng.random((n, L * E)) < 0.12).astype(np.float32)
        cases.append((rng.integers(0, 8192, n).tolist(), [-1] + rng.integers(0, 8192, n - 1).tolist(), last,
                      last * 0.5))
    eager = [pred.logits(*c) for c in cases]
    pred.capture_graphs((1, 4))
    assert pred._graphed is not None
    for c, want in zip(cases, eager):
        assert np.allclose(pred.logits(*c), want, rtol=1e-4, atol=1e-4)


def test_an_engine_with_a_lens_predictor_decodes_the_models_own_tokens(small_trace, tiny, tmp_path):
    from moeflow import LLM, SamplingParams

    torch.manual_seed(0)
    files, _ = train(tiny, [small_trace], TrainOptions(epochs=1, batch_size=256, val_fraction=0.0, lens_width=16),
                     progress=False)
    files.save(tmp_path / "pred")
    prompts = ["The river", "def main():", "Once upon a time"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    model = str(default_model_dir())
    plain = LLM(model, device="cpu", max_model_len=64, expert_budget="25%").generate(prompts, params)
    llm = LLM(model, device="cpu", max_model_len=64, expert_budget="25%", predictor=str(tmp_path / "pred"))
    assert llm.engine.predictor.net.cfg.lens_width == 16
    lens = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in lens] == [o.outputs[0].token_ids for o in plain]
    assert llm.last_stats.cache.prefetch_hits > 0, "the predictor drove prefetches"
