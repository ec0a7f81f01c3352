"""Tiny random checkpoints of every supported family, made with transformers, for exactness tests.

Router weights are scaled up so that top-k choices have clear margins, and each model is
saved in both expert layouts found on disk: per-expert tensors (what save_pretrained
writes) and fused gate_up_proj / down_proj (rewritten from the same weights).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
LAYOUTS = ("per_expert", "fused")
ROUTER_SCALE = 8.0

_COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=False)


def hf_config(family: str, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                               sliding_window=24)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, intermediate_size=96, mlp_only_layers=[2],
                                norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=3,
                                moe_intermediate_size=32, norm_topk_prob=True)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                             norm_topk_prob=False, clip_qkv=4.0, eos_token_id=1, pad_token_id=0)
    else:
        raise ValueError(family)
    cfg.bos_token_id, cfg.eos_token_id = 0, 1
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "olmoe": tf.OlmoeForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                p.mul_(ROUTER_SCALE)
            elif "norm" in name:  # random-ish norms, so a wrong norm placement shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE over a small text, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "a mixture of experts routes every token",
            "hello world, bonjour le monde, hola mundo"] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 512,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}",
    }))


_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe))\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(model_dir: Path) -> None:
    """Rewrite a per-expert checkpoint into the fused layout, in place."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            role = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}[m[3]]
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[role] = t
        else:
            out[name] = t
    for prefix, experts in groups.items():
        prefix = prefix.replace("block_sparse_moe", "mlp")  # the fused layout lives under "mlp" for every family
        order = sorted(experts)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in order])
        out[f"{prefix}.experts.down_proj"] = torch.stack([experts[e]["down"] for e in order])
        # the router of a fused Mixtral checkpoint also sits under "mlp"
        old_gate = prefix.replace(".mlp", ".block_sparse_moe") + ".gate.weight"
        if old_gate in out:
            out[f"{prefix}.gate.weight"] = out.pop(old_gate)
    save_file(out, path, metadata={"format": "pt"})


def make_checkpoint(family: str, layout: str, out: Path, seed: int = 0, **overrides) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = hf_model(family, seed, **overrides)
    model.save_pretrained(out)
    write_tokenizer(out)
    if layout == "fused":
        fuse_experts(out)
    return out
