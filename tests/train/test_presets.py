import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.train.presets import PRESETS, build_config, checkpoint_bytes, get_preset, parameter_count
from moeflow.train.trainer import build_model

VOCAB = 8192


def _meta_model(preset):
    return build_model(preset, VOCAB, sep_id=0, pad_id=1, device="meta")


@pytest.mark.parametrize("name", ["tiny", "bench", "bench-smoke"])
def test_parameter_count_matches_transformers(name):
    preset = PRESETS[name]
    model = _meta_model(preset)  # shapes only, nothing allocated
    # everything is created on the device of the context (cuda for bench), nothing in host memory
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {getattr(torch, preset.param_dtype)}
    assert sum(p.numel() for p in model.parameters()) == parameter_count(preset, VOCAB)["total"]
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts == parameter_count(preset, VOCAB)["experts"]


def test_tiny_fits_the_repository():
    tiny = get_preset("tiny")
    assert checkpoint_bytes(tiny, VOCAB) <= 32 * 10**6
    assert tiny.save_dtype == "bfloat16"
    assert tiny.num_layers >= 8 and tiny.num_experts >= 32 and tiny.top_k >= 4


def test_bench_has_production_sized_experts():
    bench = get_preset("bench")
    counts = parameter_count(bench, VOCAB)
    assert (bench.hidden_size, bench.moe_intermediate_size) == (2048, 768)
    assert counts["per_expert"] * 2 >= 4 * 2**20  # >= 4 MiB per expert in bf16
    assert counts["experts"] * 2 >= 4 * 10**9
    assert bench.num_layers >= 12 and bench.num_experts >= 48 and bench.top_k == 8
    assert (bench.num_heads, bench.head_dim, bench.num_kv_heads) == (16, 128, 4)
    assert bench.param_dtype == "bfloat16"


def test_config_sets_what_moeflow_relies_on():
    config = build_config(get_preset("tiny"), VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    assert config.architectures == ["Qwen3MoeForCausalLM"]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 1)
    assert config.norm_topk_prob is True and config.router_aux_loss_coef > 0
    assert config.max_position_embeddings == get_preset("tiny").max_position_embeddings
    assert config.num_experts == 32 and config.mlp_only_layers == []


def test_overrides_parse_by_field_type():
    p = get_preset("tiny").with_overrides({"hidden_size": "64", "lr": "1e-3", "tie_embeddings": "true"})
    assert (p.hidden_size, p.lr, p.tie_embeddings) == (64, 1e-3, True)
    with pytest.raises(ConfigError):
        get_preset("tiny").with_overrides({"hidden": "64"})
    with pytest.raises(ConfigError):
        get_preset("tiny").with_overrides({"top_k": "64"})  # more than num_experts
    with pytest.raises(ConfigError):
        get_preset("huge")
