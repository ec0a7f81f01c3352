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
    # the `bench` preset (Qwen3-30B-A3B's expert shape): (5, 1), measured on one model with every target of issue
    # 13 beside it on an H100 (docs/benchmarks/2026-12-06-h100-session15): +0.51% perplexity on five domains,
    # +0.78% on held-out python_docs, -0.5 points of multiple choice; resident 1.42-1.56x exact at batch 32 and
    # 1.25-1.28x at 64 (three runs; 1.26x in the session before, 1.05x in a two-batch run on the model before that);
    # 2.36x exact at 25% batch 32. (3, 1), the default before, has more room in accuracy (+0.30% / +0.63%) but
    # ran 1.18-1.20x at batch 64 on that model (1.17-1.26x before); (4, 1) lost 1.0 point of multiple choice and
    # ran 1.22x at batch 64 there
    ("qwen3_moe", 2048, 12, 64, 8): (5.0, 1),
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
