"""Checkpoint loading: both layouts, shards, and a clear error for every kind of broken directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeflow import LLM, SamplingParams
from moeflow.errors import BudgetError, CheckpointError, ConfigError, RequestError
from moeflow.weights.checkpoint import Checkpoint


@pytest.fixture
def model_copy(checkpoint, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint("qwen2_moe", "per_expert"), dst)
    return dst


def shard(model_dir, moved_prefix="model.layers.3"):
    """Split model.safetensors in two shards with an index, the way large checkpoints ship."""
    tensors = load_file(model_dir / "model.safetensors")
    a = {k: v for k, v in tensors.items() if not k.startswith(moved_prefix)}
    b = {k: v for k, v in tensors.items() if k.startswith(moved_prefix)}
    save_file(a, model_dir / "model-00001-of-00002.safetensors")
    save_file(b, model_dir / "model-00002-of-00002.safetensors")
    (model_dir / "model.safetensors").unlink()
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_reads_experts_lazily(model_copy):
    shard(model_copy)
    ckpt = Checkpoint(model_copy)
    gate, up, down = ckpt.read_expert(3, 5)
    ref = load_file(model_copy / "model-00002-of-00002.safetensors")
    assert torch.equal(gate, ref["model.layers.3.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(down, ref["model.layers.3.mlp.experts.5.down_proj.weight"])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_both_layouts_hold_the_same_experts(family, checkpoint):
    a, b = Checkpoint(checkpoint(family, "per_expert")), Checkpoint(checkpoint(family, "fused"))
    assert {l.kind for l in a.layouts.values()} == {"per_expert"}
    assert {l.kind for l in b.layouts.values()} == {"fused"}
    for layer in a.spec.moe_layers:
        for e in (0, a.spec.num_experts - 1):
            assert all(torch.equal(x, y) for x, y in zip(a.read_expert(layer, e), b.read_expert(layer, e)))


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint(model_copy)


def test_truncated_safetensors(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Checkpoint(model_copy)


def test_tensor_missing_from_shards_and_index(model_copy):
    weight_map = shard(model_copy)
    name = "model.layers.3.mlp.experts.6.up_proj.weight"
    b = load_file(model_copy / "model-00002-of-00002.safetensors")
    del b[name]
    save_file(b, model_copy / "model-00002-of-00002.safetensors")
    del weight_map[name]
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        Checkpoint(model_copy)


def test_index_naming_a_tensor_its_shard_lacks(model_copy):
    weight_map = shard(model_copy)
    weight_map["model.layers.0.mlp.gate.weight"] = "model-00002-of-00002.safetensors"
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json under model-00002"):
        Checkpoint(model_copy)


def test_missing_shard_file(model_copy):
    shard(model_copy)
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        Checkpoint(model_copy)


def test_wrong_shape(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.1.mlp.gate.weight"] = tensors["model.layers.1.mlp.gate.weight"][:3]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"has shape \[3, 64\], expected \[8, 64\]"):
        Checkpoint(model_copy)


def test_unknown_architecture_lists_supported(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'LlamaForCausalLM' is not supported; supported: MixtralForCausalLM, "
                                              "OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM"):
        Checkpoint(model_copy)


def test_missing_or_malformed_config(model_copy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Checkpoint(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        Checkpoint(model_copy)


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        LLM(str(model_copy), device="cpu")
    llm = LLM(str(model_copy), device="cpu", skip_tokenizer_init=True, max_model_len=64)
    assert len(llm.generate([[0, 5, 6]], SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3
    with pytest.raises(RequestError, match="without a tokenizer"):
        llm.generate(["text"])


def test_bad_requests_leave_nothing_behind(model_copy):
    llm = LLM(str(model_copy), device="cpu", max_model_len=16)
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate([""])
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate([[5], []])
    with pytest.raises(RequestError, match="prompt has 20 tokens, but the context holds 16"):
        llm.generate([[5, 6], [3] * 20])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[5, 100000]])
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_free == llm.engine.kv.rows
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2))[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-3), "top_k"), (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"), (dict(logprobs=21), "logprobs"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(stop_token_ids=[-4]), "stop_token_ids"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**kwargs)


def test_budget_too_small_names_the_smallest_that_works(model_copy):
    with pytest.raises(BudgetError, match=r"buys 1 slot\(s\) .* needs its top-2 experts .* smallest budget that works is 2 "
                                          r"slots: --expert-budget 48KiB \(or 8\.34%\)"):
        LLM(str(model_copy), device="cpu", expert_budget="5%")
    LLM(str(model_copy), device="cpu", expert_budget="48KiB")  # the suggested budget works
    LLM(str(model_copy), device="cpu", expert_budget="8.34%")
    for bad in ("25", "-5%", "0%", "1/lay", "12 parsecs", "101%"):
        with pytest.raises(ConfigError, match="expert budget"):
            LLM(str(model_copy), device="cpu", expert_budget=bad)


def test_engine_options_are_checked(model_copy):
    with pytest.raises(ConfigError, match="max_model_len=100000 exceeds"):
        LLM(str(model_copy), device="cpu", max_model_len=100000)
    with pytest.raises(ConfigError, match="device 'tpu'"):
        LLM(str(model_copy), device="tpu")
    with pytest.raises(ConfigError, match="dtype 'int4'"):
        LLM(str(model_copy), device="cpu", dtype="int4")
