"""Supported architectures, keyed by the `architectures` entry of a checkpoint's config.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moeflow.errors import CheckpointError
from moeflow.architectures.spec import ModelSpec, RouterSpec

Config = dict[str, Any]


def _req(cfg: Config, key: str, arch: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json of a {arch} checkpoint lacks '{key}'")
    return cfg[key]


def _num_experts(cfg: Config, arch: str) -> int:
    # Qwen3-MoE configs name it num_experts on the hub and num_local_experts when transformers 5 saves them
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key):
            return int(cfg[key])
    raise CheckpointError(f"config.json of a {arch} checkpoint gives neither 'num_experts' nor 'num_local_experts'")


def _rope_theta(cfg: Config, arch: str) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{arch}: rope type {rope_type!r} is not supported yet (only 'default' RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"config.json of a {arch} checkpoint gives no rope_theta")
    return float(theta)


def _eos_ids(cfg: Config) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: Config, arch: str, family: str) -> dict[str, Any]:
    if (act := cfg.get("hidden_act", "silu")) != "silu":
        raise CheckpointError(f"{arch}: activation {act!r} is not supported (only 'silu')")
    hidden = int(_req(cfg, "hidden_size", arch))
    heads = int(_req(cfg, "num_attention_heads", arch))
    layers = int(_req(cfg, "num_hidden_layers", arch))
    return dict(
        architecture=arch,
        family=family,
        vocab_size=int(_req(cfg, "vocab_size", arch)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg, arch),
        max_position_embeddings=int(_req(cfg, "max_position_embeddings", arch)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        clip_qkv=None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
    )


def _sparse_layers(cfg: Config, num_layers: int) -> tuple[int, ...]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)


def _mixtral(cfg: Config, arch: str) -> ModelSpec:
    c = _common(cfg, arch, "mixtral")
    window = cfg.get("sliding_window")
    return ModelSpec(
        **c,
        qkv_bias=False,
        o_bias=False,
        qk_norm="none",
        sliding_window=(int(window) if window else None,) * c["num_layers"],
        num_experts=int(_req(cfg, "num_local_experts", arch)),
        expert_width=int(_req(cfg, "intermediate_size", arch)),
        # Mixtral always renormalises and keeps the weights in float32 until they meet the expert output.
        router=RouterSpec(int(_req(cfg, "num_experts_per_tok", arch)), normalize=True, weights_in_model_dtype=False),
        moe_layers=tuple(range(c["num_layers"])),
        dense_intermediate_size=0,
        shared_expert_width=0,
        moe_prefixes=("block_sparse_moe", "mlp"),
    )


def _qwen_moe(cfg: Config, arch: str, family: str) -> ModelSpec:
    c = _common(cfg, arch, family)
    n = c["num_layers"]
    window = int(cfg.get("sliding_window") or 0) if cfg.get("use_sliding_window") else 0
    if family == "qwen2_moe":
        types = cfg.get("layer_types") or ["full_attention"] * n
        windows = tuple(window if (t == "sliding_attention" and window) else None for t in types)
        bias = dict(qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False, qk_norm="none")
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    else:
        windows = (window or None,) * n
        attn_bias = bool(cfg.get("attention_bias", False))
        bias = dict(qkv_bias=attn_bias, o_bias=attn_bias, qk_norm="per_head")
        shared = 0
    return ModelSpec(
        **c,
        **bias,
        sliding_window=windows,
        num_experts=_num_experts(cfg, arch),
        expert_width=int(_req(cfg, "moe_intermediate_size", arch)),
        router=RouterSpec(
            int(_req(cfg, "num_experts_per_tok", arch)),
            normalize=bool(cfg.get("norm_topk_prob", False)),
            weights_in_model_dtype=True,
        ),
        moe_layers=_sparse_layers(cfg, n),
        dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
        shared_expert_width=shared,
        moe_prefixes=("mlp",),
    )


def _olmoe(cfg: Config, arch: str) -> ModelSpec:
    c = _common(cfg, arch, "olmoe")
    clip = cfg.get("clip_qkv")
    attn_bias = bool(cfg.get("attention_bias", False))
    c["clip_qkv"] = float(clip) if clip is not None else None
    return ModelSpec(
        **c,
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        qk_norm="full",
        sliding_window=(None,) * c["num_layers"],
        num_experts=_num_experts(cfg, arch),
        expert_width=int(_req(cfg, "intermediate_size", arch)),
        router=RouterSpec(
            int(_req(cfg, "num_experts_per_tok", arch)),
            normalize=bool(cfg.get("norm_topk_prob", False)),
            weights_in_model_dtype=True,
        ),
        moe_layers=tuple(range(c["num_layers"])),
        dense_intermediate_size=0,
        shared_expert_width=0,
        moe_prefixes=("mlp",),
    )


ARCHITECTURES: dict[str, Callable[[Config, str], ModelSpec]] = {
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": lambda cfg, arch: _qwen_moe(cfg, arch, "qwen2_moe"),
    "Qwen3MoeForCausalLM": lambda cfg, arch: _qwen_moe(cfg, arch, "qwen3_moe"),
    "OlmoeForCausalLM": _olmoe,
}


def spec_from_config(cfg: Config) -> ModelSpec:
    archs = cfg.get("architectures") or []
    if not archs:
        raise CheckpointError(
            "config.json has no 'architectures' entry; supported: " + ", ".join(sorted(ARCHITECTURES))
        )
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"architecture {arch!r} is not supported; supported: " + ", ".join(sorted(ARCHITECTURES))
        )
    spec = ARCHITECTURES[arch](cfg, arch)
    if spec.router.top_k > spec.num_experts:
        raise CheckpointError(f"{arch}: num_experts_per_tok={spec.router.top_k} exceeds {spec.num_experts} experts")
    if spec.num_heads % spec.num_kv_heads:
        raise CheckpointError(f"{arch}: {spec.num_heads} attention heads do not divide into {spec.num_kv_heads} KV heads")
    return spec
