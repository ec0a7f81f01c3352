"""ModelSpec: everything the runner needs to know about an architecture, read from config.json.

One decoder implementation serves every supported family; the differences between
families are data here (which projections carry a bias, where QK-norm applies, how the
router normalises its weights), not subclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """How a family turns router logits into (topk_ids, topk_weights).

    All four families take softmax(logits in float32) then top-k; they differ in whether
    the k weights are renormalised to sum to one, and in whether the weights go back to
    the model dtype before they scale expert outputs (which matters in bfloat16).
    """

    top_k: int
    normalize: bool
    weights_in_model_dtype: bool


@dataclass(frozen=True, slots=True)
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # attention
    qkv_bias: bool
    o_bias: bool
    qk_norm: Literal["none", "per_head", "full"]  # per_head: over head_dim (Qwen3); full: over all heads (OLMoE)
    clip_qkv: float | None
    sliding_window: tuple[int | None, ...]  # per layer; attend to keys with q_pos - k_pos < window
    # mixture of experts
    num_experts: int
    expert_width: int  # I: the intermediate size of one routed expert
    router: RouterSpec
    moe_layers: tuple[int, ...]  # indices of layers whose MLP is a routed MoE block
    dense_intermediate_size: int  # MLP width of the non-MoE layers, if any
    shared_expert_width: int  # 0 when the family has no shared expert
    moe_prefixes: tuple[str, ...]  # names the MoE block may have under model.layers.N, tried in order
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # the dtype the checkpoint says it was saved in

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def expert_numel(self) -> int:
        """Elements in one routed expert: gate and up [I, H] each, down [H, I]."""
        return 3 * self.expert_width * self.hidden_size

    def expert_bytes(self, element_size: int) -> int:
        return self.expert_numel() * element_size

    def all_expert_bytes(self, element_size: int) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_bytes(element_size)
