"""Random-weight models of real architectures' shapes, for benchmarks.

A SyntheticCheckpoint reads like a Checkpoint (spec, layouts, tensor(), read_expert()) but
draws every tensor from a generator seeded by its name, so the same model appears on any
machine without a file: a Mixtral-8x7B-sized model (about 94 GB in bfloat16) is generated
straight into the host expert store. `write_checkpoint` materialises one as a Hugging Face
directory when a baseline needs to load it from disk.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from moeflow.architectures.registry import spec_from_config
from moeflow.weights.checkpoint import ExpertLayout, dense_layer_shapes, dense_numel

ROUTER_SCALE = 4.0  # router weights drawn wider than the rest, so top-k choices have clear margins

PRESETS: dict[str, dict] = {
    # Qwen3-30B-A3B's attention and expert shapes, 8 of its 48 layers, a 32k vocabulary: 5.1B parameters
    "qwen3-30b-a3b-8l": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=32000, hidden_size=2048,
        num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, norm_topk_prob=True,
        max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    # the trained bench model's shapes (moeflow.train.presets "bench") with random weights: 12 layers of 64
    # experts, top-8, 2048 x 768; for kernel timings, which do not depend on what the weights learned
    "bench-12l": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=32000, hidden_size=2048,
        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=64,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, norm_topk_prob=True,
        max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    # Mixtral-8x7B: 32 layers of 8 experts 4096 x 14336, about 94 GB in bfloat16
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, intermediate_size=14336, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", sliding_window=None,
    ),
}


class SyntheticCheckpoint:
    def __init__(self, config: dict, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu"):
        self.config = dict(config, dtype=str(dtype).removeprefix("torch."))
        self.spec = spec_from_config(self.config)
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)  # where tensors are drawn (a GPU draws 94 GB in seconds)
        prefix = self.spec.moe_prefixes[-1]
        self.layouts = {l: ExpertLayout("fused", f"model.layers.{l}.{prefix}") for l in self.spec.moe_layers}
        self.dir = Path(f"<synthetic {self.spec.architecture}>")

    @classmethod
    def preset(cls, name: str, **kwargs) -> SyntheticCheckpoint:
        return cls(PRESETS[name], **kwargs)

    @property
    def tensor_dtype(self) -> torch.dtype:
        return self.dtype

    def _generator(self, key: str) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))

    def _randn(self, shape: tuple[int, ...], key: str, std: float) -> torch.Tensor:
        t = torch.randn(shape, generator=self._generator(key), device=self.device, dtype=torch.float32)
        return (t * std).to(self.dtype)

    def dense_layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        return dense_layer_shapes(self.spec, self.layouts, layer)  # the names and shapes of a real checkpoint

    def dense_numel(self) -> int:
        return dense_numel(self.spec, self.layouts)

    def tensor(self, name: str) -> torch.Tensor:
        shape = self._shape(name)
        if name.endswith("norm.weight"):
            return (1.0 + 0.05 * torch.randn(shape, generator=self._generator(name), device=self.device)).to(self.dtype)
        std = 0.02 * (ROUTER_SCALE if name.endswith(".gate.weight") else 1.0)
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            std /= math.sqrt(2 * self.spec.num_layers)  # keep the residual stream from growing layer by layer
        return self._randn(shape, name, std)

    def _shape(self, name: str) -> tuple[int, ...]:
        s = self.spec
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (s.vocab_size, s.hidden_size)
        if name == "model.norm.weight":
            return (s.hidden_size,)
        layer = int(name.split(".")[2])
        return self.dense_layer_shapes(layer)[name]

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        I, H = self.spec.expert_width, self.spec.hidden_size
        w = self._randn((3 * I * H,), f"expert.{layer}.{expert}", 0.02)
        down = w[2 * I * H :].view(H, I) / math.sqrt(2 * self.spec.num_layers)
        return w[: I * H].view(I, H), w[I * H : 2 * I * H].view(I, H), down


def write_checkpoint(ckpt: SyntheticCheckpoint, out_dir: Path, shard_bytes: int = 4 * 2**30) -> Path:
    """Write a synthetic model as a Hugging Face directory (fused expert layout, sharded safetensors)."""
    s = ckpt.spec
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if s.tie_word_embeddings else ["lm_head.weight"])
    for layer in range(s.num_layers):
        names.extend(ckpt.dense_layer_shapes(layer))
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal shard
        shard[name] = t.contiguous().cpu()
        if sum(x.numel() * x.element_size() for x in shard.values()) >= shard_bytes:
            shards.append(shard)
            _flush(out_dir, shards, weight_map, final=False)
            shard = {}

    for name in names:
        add(name, ckpt.tensor(name))
    for layer in tqdm(s.moe_layers, desc="writing experts", unit="layer"):
        experts = [ckpt.read_expert(layer, e) for e in range(s.num_experts)]
        prefix = ckpt.layouts[layer].prefix
        add(f"{prefix}.experts.gate_up_proj", torch.stack([torch.cat([g, u]) for g, u, _ in experts]))
        add(f"{prefix}.experts.down_proj", torch.stack([d for _, _, d in experts]))
    shards.append(shard)
    _flush(out_dir, shards, weight_map, final=True)
    config = dict(ckpt.config)
    config["transformers_version"] = config.get("transformers_version", "5.17.0")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _flush(out_dir: Path, shards: list[dict], weight_map: dict[str, str], final: bool) -> None:
    """Save the newest shard under a temporary name; on the final call, name all of them and write the index."""
    from safetensors.torch import save_file

    i = len(shards)
    save_file(shards[-1], out_dir / f"shard-{i}.tmp", metadata={"format": "pt"})
    for name in shards[-1]:
        weight_map[name] = f"shard-{i}.tmp"
    shards[-1] = {}  # written: free the memory
    if not final:
        return
    n = len(shards)
    renamed = {}
    for j in range(1, n + 1):
        final_name = f"model-{j:05d}-of-{n:05d}.safetensors"
        (out_dir / f"shard-{j}.tmp").rename(out_dir / final_name)
        renamed[f"shard-{j}.tmp"] = final_name
    index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
