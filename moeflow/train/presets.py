"""Presets for the reference models moeflow trains itself: model shape and training recipe in one record.

`tiny` is small enough to commit (<= 32 MB of bf16 safetensors) and to train on two CPU cores in ten minutes;
`bench` has production-sized experts (Qwen3-30B-A3B's 2048 x 768) so that moving experts costs what it costs
in real life, and trains on one H100 in a few minutes. `bench-smoke` is `bench`'s code path (bf16 parameters,
fp32 master weights, sharded save) at a size a CPU test can run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moeflow.errors import ConfigError

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    # model (Qwen3MoeConfig fields)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    max_position_embeddings: int
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    aux_loss_coef: float = 0.01
    # data
    seq_len: int = 256
    micro_batch: int = 16
    grad_accum: int = 1
    domain_alpha: float = 0.5  # domain d is drawn with probability proportional to tokens_d ** alpha
    # optimisation
    steps: int = 400  # used when neither --steps nor --max-minutes says otherwise
    warmup_steps: int = 30
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # precision: parameters are held in param_dtype; bf16 parameters get fp32 master weights in the optimizer,
    # whose moments are held in state_dtype
    param_dtype: str = "float32"
    state_dtype: str = "float32"
    save_dtype: str = "bfloat16"
    max_shard_size: str = "2GB"
    # validation
    eval_every: int = 50
    eval_windows_per_domain: int = 4

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "moe_intermediate_size",
                  "num_experts", "top_k", "seq_len", "micro_batch", "grad_accum", "steps", "eval_every",
                  "eval_windows_per_domain", "max_position_embeddings"):
            if getattr(self, f) < 1:
                raise ConfigError(f"preset {self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"preset {self.name}: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"preset {self.name}: num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.seq_len > self.max_position_embeddings:
            raise ConfigError(f"preset {self.name}: seq_len={self.seq_len} exceeds max_position_embeddings")
        for f in ("param_dtype", "state_dtype", "save_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"preset {self.name}: {f} must be one of {DTYPES}, got {getattr(self, f)!r}")
        if self.warmup_steps < 0 or not 0 < self.min_lr_ratio <= 1:
            raise ConfigError(f"preset {self.name}: warmup_steps must be >= 0 and min_lr_ratio in (0, 1]")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum

    def with_overrides(self, overrides: dict[str, str]) -> "Preset":
        """A copy with fields replaced from strings (`--override hidden_size=64`), parsed by the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, object] = {}
        for key, text in overrides.items():
            if key not in fields or key == "name":
                raise ConfigError(f"unknown preset field {key!r}; fields: {', '.join(sorted(fields))}")
            current = getattr(self, key)
            try:
                if isinstance(current, bool):
                    if text.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(text)
                    values[key] = text.lower() in ("true", "1")
                else:
                    values[key] = type(current)(text)
            except ValueError:
                raise ConfigError(f"override {key}={text!r}: expected {type(current).__name__}") from None
        return dataclasses.replace(self, **values)


PRESETS: dict[str, Preset] = {
    # 13.1 M parameters -> 26.2 MB of bf16 safetensors. On 2 CPU cores (float32) about 1.1k tokens/s: ten minutes
    # reach a validation loss of about 6.1. Small batches: at a fixed ~1 M-token budget, 1k-token steps reached a
    # lower loss than 2k- or 4k-token steps. The bundled model was trained on an H200 with micro_batch=32
    # (8k-token steps, ~80k tokens/s): 10 M tokens in 130 s, validation loss 4.06 (its model card).
    "tiny": Preset(
        name="tiny", hidden_size=160, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=40,
        moe_intermediate_size=80, num_experts=32, top_k=4, max_position_embeddings=1024,
        seq_len=256, micro_batch=4, steps=1000, warmup_steps=30, lr=3e-3, eval_every=100,
    ),
    # 3.78 B parameters, 7.2 GB of bf16 expert weights (9.4 MB per expert); bf16 parameters with fp32 master
    # weights and bf16 Adam moments: ~45 GB of model + optimizer state on the GPU
    "bench": Preset(
        name="bench", hidden_size=2048, num_layers=12, num_heads=16, num_kv_heads=4, head_dim=128,
        moe_intermediate_size=768, num_experts=64, top_k=8, max_position_embeddings=4096,
        seq_len=512, micro_batch=16, grad_accum=1, steps=400, warmup_steps=30, lr=6e-4,
        param_dtype="bfloat16", state_dtype="bfloat16", eval_every=100, eval_windows_per_domain=2,
    ),
    # bench's code path at CPU-test size (not listed in --help)
    "bench-smoke": Preset(
        name="bench-smoke", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        moe_intermediate_size=32, num_experts=8, top_k=2, max_position_embeddings=256,
        seq_len=64, micro_batch=2, grad_accum=2, steps=4, warmup_steps=2, lr=1e-3,
        param_dtype="bfloat16", state_dtype="bfloat16", max_shard_size="100KB", eval_every=2,
        eval_windows_per_domain=1,
    ),
}
PUBLIC_PRESETS = ("tiny", "bench")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PUBLIC_PRESETS)}") from None


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """The embedding rows for a tokenizer: rounded up to a multiple of 64 so GPU matmuls stay aligned."""
    return -(-tokenizer_vocab // 64) * 64


def build_config(preset: Preset, vocab_size: int, bos_token_id: int, eos_token_id: int,
                 pad_token_id: int | None = None):
    """The `Qwen3MoeConfig` of a preset, with every field moeflow relies on set explicitly."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=4 * preset.hidden_size,  # unused: every layer is sparse (mlp_only_layers=[])
        moe_intermediate_size=preset.moe_intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        num_experts=preset.num_experts,
        num_experts_per_tok=preset.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=preset.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        tie_word_embeddings=preset.tie_embeddings,
        router_aux_loss_coef=preset.aux_loss_coef,
        # the trainer asks for router logits per forward call; a saved config that returned them by default
        # would make every inference call pay for them
        output_router_logits=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


def parameter_count(preset: Preset, vocab_size: int) -> dict[str, int]:
    """Parameters by kind, computed from the shapes alone (no model is built)."""
    h, e, i = preset.hidden_size, preset.num_experts, preset.moe_intermediate_size
    q = preset.num_heads * preset.head_dim
    kv = preset.num_kv_heads * preset.head_dim
    attention = h * q + 2 * h * kv + q * h + 2 * preset.head_dim  # q,k,v,o + q_norm,k_norm
    experts = e * 3 * h * i
    per_layer_other = attention + e * h + 2 * h  # + router + two RMSNorms
    embeddings = vocab_size * h * (1 if preset.tie_embeddings else 2)
    counts = {
        "experts": preset.num_layers * experts,
        "dense": preset.num_layers * per_layer_other + embeddings + h,
        "per_expert": 3 * h * i,
        "active_per_token": preset.num_layers * (preset.top_k * 3 * h * i + per_layer_other)
        + vocab_size * h,
    }
    counts["total"] = counts["experts"] + counts["dense"]
    return counts


def checkpoint_bytes(preset: Preset, vocab_size: int) -> int:
    """Bytes of tensor data the saved checkpoint holds (safetensors headers excluded)."""
    return parameter_count(preset, vocab_size)["total"] * (2 if preset.save_dtype == "bfloat16" else 4)
