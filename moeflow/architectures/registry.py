"""Supported architectures, keyed by the `architectures` entry of a checkpoint's config.json.

Every field the engine uses is checked here, by name: a value of the wrong type (160.7 for a
width, "10000" for rope_theta, true for a count) or out of range (0 experts per token, a
negative norm epsilon, a NaN rope_theta) is refused at load rather than truncated, cast or
left to surface as an IndexError or NaN output at the first request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from moeflow.errors import CheckpointError
from moeflow.architectures.spec import ModelSpec, RouterSpec

Config = dict[str, Any]
_REQUIRED = object()


def _show(value: Any) -> str:
    """A value as config.json writes it."""
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def _bad(key: str, want: str, value: Any) -> CheckpointError:
    return CheckpointError(f"config.json: {key} must be {want}, got {_show(value)}")


def _int(cfg: Config, key: str, arch: str, *, lo: int = 1, default: Any = _REQUIRED) -> int:
    """An integer field: a JSON integer (not 160.7, 160.0, "160" or true) of at least `lo`."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(f"config.json of a {arch} checkpoint lacks '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _bad(key, f"an integer >= {lo}", value)
    return value


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(key, "a finite number > 0", value)
    return float(value)


def _bool(cfg: Config, key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(key, "true or false", value)
    return value


def _num_experts(cfg: Config, arch: str) -> int:
    # Qwen3-MoE configs name it num_experts on the hub and num_local_experts when transformers 5 saves them
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key) is not None:
            return _int(cfg, key, arch)
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
    return _positive_float("rope_theta", theta)


def _token_ids(cfg: Config, key: str, vocab: int) -> tuple[int, ...]:
    value = cfg.get(key)
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise _bad(key, f"a token id (or a list of them) in [0, vocab_size={vocab})", value)
    return tuple(ids)


def _window(cfg: Config, arch: str) -> int | None:
    """sliding_window, where the family uses one: null or 0 for none, else a positive integer."""
    if not cfg.get("sliding_window"):
        return None
    return _int(cfg, "sliding_window", arch)


def _common(cfg: Config, arch: str, family: str) -> dict[str, Any]:
    if (act := cfg.get("hidden_act", "silu")) != "silu":
        raise CheckpointError(f"{arch}: activation {act!r} is not supported (only 'silu')")
    hidden = _int(cfg, "hidden_size", arch)
    heads = _int(cfg, "num_attention_heads", arch)
    layers = _int(cfg, "num_hidden_layers", arch)
    vocab = _int(cfg, "vocab_size", arch)
    kv_heads = _int(cfg, "num_key_value_heads", arch, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"config.json: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
    head_dim = _int(cfg, "head_dim", arch, default=hidden // heads)
    if head_dim % 2:
        raise _bad("head_dim", "even (rotary embeddings rotate pairs of dimensions)", head_dim)
    bos = _token_ids(cfg, "bos_token_id", vocab)
    return dict(
        architecture=arch,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_float("rms_norm_eps", 1e-6 if cfg.get("rms_norm_eps") is None else cfg["rms_norm_eps"]),
        rope_theta=_rope_theta(cfg, arch),
        max_position_embeddings=_int(cfg, "max_position_embeddings", arch, lo=2),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False),
        clip_qkv=None,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(cfg, "eos_token_id", vocab),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
    )


def _router(cfg: Config, arch: str, *, normalize: bool, weights_in_model_dtype: bool) -> RouterSpec:
    return RouterSpec(_int(cfg, "num_experts_per_tok", arch), normalize=normalize,
                      weights_in_model_dtype=weights_in_model_dtype)


def _sparse_layers(cfg: Config, arch: str, num_layers: int) -> tuple[int, ...]:
    step = _int(cfg, "decoder_sparse_step", arch, default=1)
    dense_only = cfg.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in dense_only):
        raise _bad("mlp_only_layers", f"a list of layer indices in [0, num_hidden_layers={num_layers})", dense_only)
    return tuple(i for i in range(num_layers) if i not in set(dense_only) and (i + 1) % step == 0)


def _mixtral(cfg: Config, arch: str) -> ModelSpec:
    c = _common(cfg, arch, "mixtral")
    return ModelSpec(
        **c,
        qkv_bias=False,
        o_bias=False,
        qk_norm="none",
        sliding_window=(_window(cfg, arch),) * c["num_layers"],
        num_experts=_int(cfg, "num_local_experts", arch),
        expert_width=_int(cfg, "intermediate_size", arch),
        # Mixtral always renormalises and keeps the weights in float32 until they meet the expert output.
        router=_router(cfg, arch, normalize=True, weights_in_model_dtype=False),
        moe_layers=tuple(range(c["num_layers"])),
        dense_intermediate_size=0,
        shared_expert_width=0,
        moe_prefixes=("block_sparse_moe", "mlp"),
    )


def _qwen_moe(cfg: Config, arch: str, family: str) -> ModelSpec:
    c = _common(cfg, arch, family)
    n = c["num_layers"]
    window = _window(cfg, arch) if _bool(cfg, "use_sliding_window", False) else None
    if family == "qwen2_moe":
        types = cfg.get("layer_types") or ["full_attention"] * n
        if not isinstance(types, list) or len(types) != n or not all(isinstance(t, str) for t in types):
            raise _bad("layer_types", f"a list of {n} attention types, one per layer", types)
        windows = tuple(window if t == "sliding_attention" else None for t in types)
        bias = dict(qkv_bias=_bool(cfg, "qkv_bias", True), o_bias=False, qk_norm="none")
        shared = _int(cfg, "shared_expert_intermediate_size", arch, lo=0, default=0)
    else:
        windows = (window,) * n
        attn_bias = _bool(cfg, "attention_bias", False)
        bias = dict(qkv_bias=attn_bias, o_bias=attn_bias, qk_norm="per_head")
        shared = 0
    moe_layers = _sparse_layers(cfg, arch, n)
    # the width of the layers that are not MoE, where there are any
    dense_width = _int(cfg, "intermediate_size", arch) if len(moe_layers) < n else 0
    return ModelSpec(
        **c,
        **bias,
        sliding_window=windows,
        num_experts=_num_experts(cfg, arch),
        expert_width=_int(cfg, "moe_intermediate_size", arch),
        router=_router(cfg, arch, normalize=_bool(cfg, "norm_topk_prob", False), weights_in_model_dtype=True),
        moe_layers=moe_layers,
        dense_intermediate_size=dense_width,
        shared_expert_width=shared,
        moe_prefixes=("mlp",),
    )


def _olmoe(cfg: Config, arch: str) -> ModelSpec:
    c = _common(cfg, arch, "olmoe")
    clip = cfg.get("clip_qkv")
    attn_bias = _bool(cfg, "attention_bias", False)
    c["clip_qkv"] = _positive_float("clip_qkv", clip) if clip is not None else None
    return ModelSpec(
        **c,
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        qk_norm="full",
        sliding_window=(None,) * c["num_layers"],
        num_experts=_num_experts(cfg, arch),
        expert_width=_int(cfg, "intermediate_size", arch),
        router=_router(cfg, arch, normalize=_bool(cfg, "norm_topk_prob", False), weights_in_model_dtype=True),
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
    return spec
