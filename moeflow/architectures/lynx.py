"""LYNX's (alpha, beta) per model: published values by family, measured ones for moeflow's own models.

routing/lynx.py applies them (AffinityBinning); they live here, beside the registry, because they are a
property of an architecture's router, like its top-k.
"""

from __future__ import annotations

from moeflow.architectures.spec import ModelSpec
from moeflow.errors import ConfigError

# (alpha, beta) published with LYNX (arXiv 2411.08982 and its public implementation), by the family moeflow's registry names
PUBLISHED_DEFAULTS: dict[str, tuple[float, int]] = {
    "qwen3_moe": (3.0, 2),  # Qwen3-30B-A3B
    "qwen2_moe": (3.0, 4),  # Qwen2-57B-A14B
    "mixtral": (0.7, 1),  # Mixtral-8x7B; 8x22B below
}
MIXTRAL_8X22B_DEFAULTS = (1.0, 1)
# Not published: OLMoE (64 experts, top-8, softmax without renormalisation) is a fine-grained router like
# Qwen3-30B-A3B's (128 experts, top-8), so it takes Qwen3's values until measured.
OLMOE_DEFAULTS = (3.0, 2)
# moeflow's own trained models, recognised by shape (ModelSpec carries nothing else from config.json):
# (family, hidden, layers, experts, top-k) -> (alpha, beta), measured on held-out text at batch 32.
MOEFLOW_MODEL_DEFAULTS: dict[tuple[str, int, int, int, int], tuple[float, int]] = {
    ("qwen3_moe", 160, 8, 32, 4): (2.5, 2),  # moeflow-tiny: docs/lynx/README.md
    # the `bench` preset (Qwen3-30B-A3B's expert shape): +0.28% perplexity on five domains, +0.69% on python_docs,
    # multiple choice unchanged, 1.15x exact resident at batch 32 against 1.10x for Qwen3's (3, 2)
    # (docs/benchmarks/2026-12-06-h200-session9); on an H100 with async scheduling +0.57% / +0.46%, +0.5 points,
    # 1.36-1.45x / 1.17-1.26x exact resident at batch 32 / 64 (docs/benchmarks/2026-12-06-h100-session13). (5, 1),
    # +0.96% / +0.75% there, ran 1.05x at batch 64 there and 1.26x on the next session's model, where (3, 1) ran
    # 1.20x (docs/benchmarks/2026-12-06-h100-session14); its multiple-choice accuracy is not measured
    ("qwen3_moe", 2048, 12, 64, 8): (3.0, 1),
}


def lynx_defaults(spec: ModelSpec) -> tuple[float, int]:
    """The (alpha, beta) LYNX uses for a model: measured for moeflow's own models, published by family."""
    shape = (spec.family, spec.hidden_size, spec.num_layers, spec.num_experts, spec.router.top_k)
    if shape in MOEFLOW_MODEL_DEFAULTS:
        return MOEFLOW_MODEL_DEFAULTS[shape]
    if spec.family == "mixtral" and spec.hidden_size >= 6144:  # 8x22B (6144 wide, 56 layers); 8x7B is 4096
        return MIXTRAL_8X22B_DEFAULTS
    if spec.family == "olmoe":
        return OLMOE_DEFAULTS
    if spec.family in PUBLISHED_DEFAULTS:
        return PUBLISHED_DEFAULTS[spec.family]
    raise ConfigError(f"no LYNX defaults for family {spec.family!r}; give alpha and beta")
