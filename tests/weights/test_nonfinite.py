"""NaN and Inf in the weights are refused as they are read, naming the tensor and its shard file.

Dense weights are read (and checked) by the checkpoint reader when the model loads; routed
experts by the host store as it fills each expert's buffer, which the engine does for every
expert at start-up, so a bad expert is refused at load even when the pool is offloaded.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeflow import LLM
from moeflow.errors import CheckpointError
from moeflow.experts.store import ExpertStore
from moeflow.weights.checkpoint import Checkpoint

NAN, INF = float("nan"), float("inf")
ENGINE = dict(device="cpu", expert_budget="25%", max_model_len=64)


def copy_of(checkpoint, tmp_path, family="qwen2_moe", layout="per_expert"):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint(family, layout), dst)
    return dst


def poison(model_dir, name, value, flat_index=5):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    t = tensors[name].clone()
    t.view(-1)[flat_index] = value
    tensors[name] = t
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name, value", [
    ("model.layers.1.mlp.experts.3.up_proj.weight", NAN),  # a routed expert
    ("model.layers.0.input_layernorm.weight", NAN),  # a norm
    ("model.layers.1.mlp.gate.weight", INF),  # a router
    ("model.embed_tokens.weight", NAN),
    ("lm_head.weight", -INF),
    ("model.layers.2.mlp.down_proj.weight", NAN),  # the dense MLP of qwen2_moe's mlp_only layer
    ("model.layers.1.mlp.shared_expert.up_proj.weight", INF),
])
def test_a_nonfinite_weight_is_refused_at_load_naming_tensor_and_shard(checkpoint, tmp_path, name, value):
    model = copy_of(checkpoint, tmp_path)
    poison(model, name, value)
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(CheckpointError, match=rf"'{name}'.* in model\.safetensors .*{kind}"):
        LLM(str(model), **ENGINE)


def test_a_nonfinite_fused_expert_is_refused_naming_the_expert(checkpoint, tmp_path):
    model = copy_of(checkpoint, tmp_path, "mixtral", "fused")
    poison(model, "model.layers.2.mlp.experts.gate_up_proj", NAN, flat_index=5 * 64 * 64 + 70)  # expert 5
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.gate_up_proj'.*expert 5"):
        LLM(str(model), **ENGINE)


def test_garbage_written_into_a_shard_is_refused(checkpoint, tmp_path):
    model = copy_of(checkpoint, tmp_path)
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at : at + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"in model\.safetensors .*(NaN|Inf)"):
        LLM(str(model), **ENGINE)


def test_allow_nonfinite_weights_loads_anyway(checkpoint, tmp_path):
    model = copy_of(checkpoint, tmp_path)
    poison(model, "model.layers.1.mlp.experts.3.up_proj.weight", NAN)
    poison(model, "model.layers.0.input_layernorm.weight", INF)
    llm = LLM(str(model), allow_nonfinite_weights=True, **ENGINE)
    assert llm.engine.config.allow_nonfinite_weights


def test_a_lazily_read_bad_expert_fails_with_the_tensor_name(checkpoint, tmp_path):
    """A store left to fill on demand (not the engine's way) still never hands out a bad expert."""
    model = copy_of(checkpoint, tmp_path)
    poison(model, "model.layers.3.mlp.experts.6.down_proj.weight", NAN)
    ckpt = Checkpoint(model)
    store = ExpertStore(ckpt, ckpt.spec, torch.float32, pin=False)
    store.get(3, 5)  # its neighbour is fine
    with pytest.raises(CheckpointError, match=r"'model\.layers\.3\.mlp\.experts\.6\.down_proj\.weight'.*NaN"):
        store.get(3, 6)


def test_a_value_the_compute_dtype_cannot_hold_is_refused(checkpoint, tmp_path):
    """float32 weights served in float16: 1e6 becomes Inf in the store's buffer."""
    model = copy_of(checkpoint, tmp_path)
    poison(model, "model.layers.1.mlp.experts.2.gate_proj.weight", 1e6)
    ckpt = Checkpoint(model)
    store = ExpertStore(ckpt, ckpt.spec, torch.float16, pin=False)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight'.*float16"):
        store.get(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 31, 4099])
def test_first_nonfinite_finds_every_kind_anywhere(dtype, n):
    from moeflow.weights.finite import first_nonfinite

    assert first_nonfinite(torch.randn(n).to(dtype)) is None
    for pos in {0, n // 2, n - 1}:
        for bad in (NAN, INF, -INF):
            t = torch.randn(n).to(dtype)
            t[pos] = bad
            kind = "NaN" if bad != bad else ("+Inf" if bad > 0 else "-Inf")
            assert first_nonfinite(t.view(1, n)) == ((0, pos), kind)


def test_the_bundled_checkpoint_is_finite():
    from moeflow.assets import default_model_dir
    from moeflow.weights.finite import first_nonfinite

    ckpt = Checkpoint(default_model_dir())
    for shard in sorted(ckpt.dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                assert first_nonfinite(f.get_tensor(name)) is None, name
