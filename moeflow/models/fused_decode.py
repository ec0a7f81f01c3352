"""The small operations of a decode step, each one kernel launch instead of several (`EngineConfig.fused_ops`).

Without fusion a layer of a decode step runs dozens of kernels of a few microseconds of element-wise work
each: the two RMSNorms (six launches each), the residual add, the QK norm and rotary embedding of q and k
(about thirty for Qwen3's per-head norm), the KV-cache writes, the router's softmax, top-k and renormalisation.
On a GPU each costs its launch and its minimum duration whatever the batch. The bench model's resident batch-1
step took 2.66 ms on an H200 (2026-12-02) where reading its weights takes about 0.3 ms; these launches are the
likely rest. On an H100 (2026-12-05, docs/benchmarks/2026-12-05-h100-session8) tools/kernel_profile.py counted 872
kernels in that step without fusion and 215 with it, and the step ran 1.93x faster at batch 1 and 1.49x at batch
64; the trained model decoded 1.43x / 1.39x the tokens/s at batch 32 / 64. Here each group is one kernel:

    rms_norm(x, weight, eps, delta=None) -> (x + delta, RMSNorm(x + delta))      [T, H], 1 launch
    qk_rope_store(qkv, ...) -> q                clip, QK norm, rotary; k and v into the cache, 1 launch
    route_into(logits, router, out) -> (ids, weights)    softmax, top-k, renormalise into the record, 1 launch

Without fusion the model runs the plain-torch operations of layers.py and router.py: they are the definition
the kernels are tested against. The Triton kernels (fused_decode_triton.py) keep torch's rounding points (every
product and sum rounded to the model dtype where torch rounds it); only float32 reductions may differ in the
order of their terms, so results agree to float32 rounding, not bit for bit.
Fusion is a choice of the engine, made once: every configuration of one engine runs the same kernels, so the
exact mode's invariant (the same tokens at every budget, policy, predictor and schedule) holds within it.
"""

from __future__ import annotations

import os

import torch

from moeflow.architectures.spec import ModelSpec, RouterSpec
from moeflow.experts.kernels import triton_available
from moeflow.models.layers import Rotary

NORM_MODES = {"none": 0, "per_head": 1, "full": 2}


def fused_available(device: torch.device) -> bool:
    """The kernels can run here: CUDA with Triton, or Triton's interpreter on CPU tensors."""
    if not triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) with h = x + delta, or x itself when delta is None (layers.rms_norm after torch's add)."""
    from moeflow.models.fused_decode_triton import rms_norm_triton

    return rms_norm_triton(x, weight, eps, delta)


def qk_rope_store(qkv: torch.Tensor, spec: ModelSpec, positions: torch.Tensor, rows: torch.Tensor, rotary: Rotary,
                  q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> torch.Tensor:
    """One decode token per row of qkv [T, (N + 2G) * D] (the q, k and v projections side by side, biases
    added): clip (spec.clip_qkv), QK norm (spec.qk_norm), rotary embedding at `positions` [T]; k and v written
    to cache row `rows[t]` at position `positions[t]` of k_cache, v_cache [R, G, M, D]. Returns q [T, N, D].
    The unfused path is MoEModel._attention's (the definition the kernel is tested against)."""
    from moeflow.models.fused_decode_triton import qk_rope_store_triton

    s = spec
    return qk_rope_store_triton(qkv, s.num_heads, s.num_kv_heads, s.head_dim, positions, rows, rotary.cos,
                                rotary.sin, q_norm, k_norm, NORM_MODES[s.qk_norm], s.rms_norm_eps, s.clip_qkv,
                                k_cache, v_cache)


def route_into(logits: torch.Tensor, router: RouterSpec,
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice for logits [T, E] written into out = (ids [T, K] int64, weights [T, K], float32
    scratch [T, K], unused here), as router.route(logits, router, out=out); returns (ids, weights)."""
    from moeflow.models.fused_decode_triton import route_triton

    ids, weights, _ = out
    route_triton(logits, router.top_k, router.normalize, ids, weights)
    return ids, weights


__all__ = ["NORM_MODES", "fused_available", "qk_rope_store", "rms_norm", "route_into"]
