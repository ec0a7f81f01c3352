"""Config values that would load and then misbehave are refused at load, naming the field and its value:
config.json's fields, weights stored in a type the engine would silently cast, a layer count that does
not match the checkpoint, and a chat template that cannot compile."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeflow import LLM
from moeflow.errors import CheckpointError
from moeflow.weights.checkpoint import Checkpoint


@pytest.fixture
def model_copy(checkpoint, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint("qwen3_moe", "per_expert"), dst)
    return dst


def edit_config(model_dir, **fields):
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in fields.items():
        if key == "rope_theta" and "rope_parameters" in cfg:
            cfg["rope_parameters"]["rope_theta"] = value
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))  # json writes NaN as the literal NaN, which json.loads reads back


@pytest.mark.parametrize("field, value", [
    ("num_experts_per_tok", 0),
    ("num_experts_per_tok", 9),  # more than the 8 experts
    ("num_experts_per_tok", 2.5),
    ("rms_norm_eps", -1),
    ("rms_norm_eps", 0),
    ("rms_norm_eps", float("nan")),
    ("rope_theta", 0),
    ("rope_theta", float("nan")),
    ("rope_theta", float("inf")),
    ("rope_theta", "10000"),
    ("max_position_embeddings", 0),
    ("max_position_embeddings", 1),
    ("hidden_size", 64.7),
    ("hidden_size", 64.0),
    ("hidden_size", True),
    ("vocab_size", "320"),
    ("vocab_size", -320),
    ("num_attention_heads", 0),
    ("num_key_value_heads", 0),
    ("num_key_value_heads", 3),  # 4 heads do not divide into 3 KV heads
    ("head_dim", 15),  # rotary embeddings rotate pairs of dimensions
    ("num_local_experts", 0),
    ("moe_intermediate_size", -32),
    ("decoder_sparse_step", 0),
    ("mlp_only_layers", [7]),
    ("eos_token_id", 10**6),
    ("bos_token_id", -1),
    ("tie_word_embeddings", "yes"),
    ("num_hidden_layers", 3),  # the checkpoint holds 4: the last would be silently ignored
    ("num_hidden_layers", 5),
    ("num_hidden_layers", 0),
])
def test_a_bad_config_field_is_refused_naming_it(model_copy, field, value):
    edit_config(model_copy, **{field: value})
    shown = re.escape(json.dumps(value)[:6])  # messages show the value as config.json writes it
    with pytest.raises(CheckpointError, match=rf"\b{field}\b.*{shown}"):
        Checkpoint(model_copy)


def test_a_sliding_window_in_use_must_be_positive(model_copy):
    edit_config(model_copy, use_sliding_window=True, sliding_window=-4)
    with pytest.raises(CheckpointError, match=r"sliding_window.*-4"):
        Checkpoint(model_copy)


@pytest.mark.parametrize("field, value", [("num_local_experts", 8.5), ("intermediate_size", 0),
                                          ("num_experts_per_tok", None)])
def test_mixtral_fields_are_checked_too(checkpoint, tmp_path, field, value):
    model = tmp_path / "mixtral"
    shutil.copytree(checkpoint("mixtral", "per_expert"), model)
    edit_config(model, **{field: value})
    with pytest.raises(CheckpointError, match=rf"\b{field}\b"):
        Checkpoint(model)


def test_extra_experts_in_the_checkpoint_are_refused(model_copy):
    edit_config(model_copy, num_local_experts=6, num_experts_per_tok=2)  # the checkpoint holds 8 per layer
    with pytest.raises(CheckpointError, match=r"num_local_experts=6.*8 experts"):
        Checkpoint(model_copy)


def test_a_sound_config_still_loads(model_copy):
    Checkpoint(model_copy)


def test_a_weight_stored_as_an_integer_is_refused(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"'{name}' in model\.safetensors is stored as I32"):
        Checkpoint(model_copy)


def test_an_expert_stored_as_an_integer_is_refused(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.2.mlp.experts.4.down_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"'{name}' in model\.safetensors is stored as I8"):
        Checkpoint(model_copy)


def test_a_chat_template_that_cannot_compile_is_refused_at_load(model_copy):
    path = model_copy / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] | frobnicate }}{% endfor %}"
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json.*chat_template.*frobnicate"):
        LLM(str(model_copy), device="cpu", max_model_len=64)
