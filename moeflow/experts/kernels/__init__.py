"""Fused expert compute over the device slot pool: Dispatch -> Experts -> Combine of one MoE layer.

T tokens, K top-k, H hidden, I expert width, S slots.
    out [T, H] = fused_moe(x [T, H], slot_ids [T, K], weights [T, K], w_gate_up [S, 2I, H], w_down [S, H, I])
    fused_moe_rows(..., rows [T, K, H] float32)   # experts only; then combine_rows(rows, x.dtype)
with w_gate_up = pool[:, :2IH].view(S, 2I, H) and w_down = pool[:, 2IH:].view(S, H, I) (strided views: no
backend copies the pool). slot_ids -1 marks a dropped pick. Contract and exact semantics: reference.py.

Backends: "reference" (plain torch, any device: the definition), "grouped" (torch._grouped_mm; graph-capturable
on CUDA for bfloat16), "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1). "auto" picks triton
on CUDA when triton imports, else reference. Triton is imported only when the triton backend is used.
"""

import functools
import os

import torch

from moeflow.experts.kernels.reference import combine_rows, moe_reference, reference_rows

BACKENDS = ("auto", "triton", "grouped", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install (missing libs, ...) counts as absent
        return False
    return True


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """The concrete backend "auto" stands for on x's device, or a clear error for an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def fused_moe_rows(x, slot_ids, weights, w_gate_up, w_down, rows, *, backend: str = "auto") -> None:
    """Experts only, no combine: rows [T, K, H] float32 gets weights[t, k] * expert(slot_ids[t, k])(x[t]) for
    every live pick and keeps its old content where slot_ids is -1 (fill rows over several cache rounds,
    then combine_rows once: the result is the same as one fused_moe call)."""
    name = resolve_backend(x, backend)
    if name == "triton":
        from moeflow.experts.kernels.triton_moe import triton_rows

        return triton_rows(x, slot_ids, weights, w_gate_up, w_down, rows)
    if name == "grouped":
        from moeflow.experts.kernels.grouped import grouped_rows

        return grouped_rows(x, slot_ids, weights, w_gate_up, w_down, rows)
    return reference_rows(x, slot_ids, weights, w_gate_up, w_down, rows)


def fused_moe(x, slot_ids, weights, w_gate_up, w_down, *, backend: str = "auto",
              tile_slots: int | None = None) -> torch.Tensor:
    """`tile_slots`: the pool size the Triton kernels choose their tiles for (default: S, the slots given). A caller
    that passes a slice of a larger pool passes the pool's size, so the tiles, and with them the rounding, are
    the ones a call over the whole pool would use."""
    name = resolve_backend(x, backend)
    if name == "triton":
        from moeflow.experts.kernels.triton_moe import moe_triton, pick_config

        config = None
        if tile_slots is not None:
            config = pick_config(slot_ids.numel(), tile_slots, x.shape[-1], w_down.shape[2], x.dtype)
        return moe_triton(x, slot_ids, weights, w_gate_up, w_down, config=config)
    if name == "grouped":
        from moeflow.experts.kernels.grouped import moe_grouped

        return moe_grouped(x, slot_ids, weights, w_gate_up, w_down)
    return moe_reference(x, slot_ids, weights, w_gate_up, w_down)


__all__ = [
    "BACKENDS", "combine_rows", "fused_moe", "fused_moe_rows", "moe_reference", "reference_rows", "resolve_backend",
    "triton_available",
]
