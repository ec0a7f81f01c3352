"""Shared by the expert-kernel tests: a random slot pool, routing, and the float64 formula they are checked against.

T tokens, K top-k, H hidden, I expert width, S slots.
"""

import torch

from moeflow.experts.kernels import combine_rows, fused_moe_rows


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pool_views(pool: torch.Tensor, H: int, I: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = pool.shape[0]
    return pool[:, : 2 * I * H].view(S, 2 * I, H), pool[:, 2 * I * H :].view(S, H, I)


def make_pool(S, H, I, dtype, device, gen) -> torch.Tensor:
    """[S, 3IH] with gate/up ~ N(0, 1/H) and down ~ N(0, 1/I): activations stay O(1), fp16 cannot overflow."""
    pool = torch.empty(S, 3 * I * H, dtype=dtype, device=device)
    pool.normal_(generator=gen)
    w_gate_up, w_down = pool_views(pool, H, I)
    w_gate_up.mul_(H**-0.5)
    w_down.mul_(I**-0.5)
    return pool


def make_routing(T, K, S, device, gen, *, drop=0.0, ids_dtype=torch.int64):
    """Distinct slots per token (as a router's top-k), a fraction `drop` of picks set to -1."""
    scores = torch.rand(T, S, generator=gen, device=device)
    ids = scores.topk(K, dim=1).indices
    if drop:
        ids = torch.where(torch.rand(T, K, generator=gen, device=device) < drop, -1, ids)
    weights = torch.rand(T, K, generator=gen, device=device) + 0.1
    return ids.to(ids_dtype), weights


def make_case(T, K, H, I, S, dtype=torch.float32, device="cpu", *, seed=0, drop=0.2, ids_dtype=torch.int64):
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = make_pool(S, H, I, dtype, device, gen)
    x = torch.randn(T, H, generator=gen, device=device).to(dtype)
    ids, weights = make_routing(T, K, S, device, gen, drop=drop, ids_dtype=ids_dtype)
    return x, ids, weights, pool


def naive_dense(x, ids, weights, w_gate_up, w_down):
    """Per token, per pick, full float64 matmuls: the formula with no batching at all."""
    T, H = x.shape
    I = w_down.shape[2]
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(ids.shape[1]):
            s = int(ids[t, k])
            if s < 0:
                continue
            xt = x[t].double()
            gate, up = w_gate_up[s, :I].double(), w_gate_up[s, I:].double()
            h = torch.nn.functional.silu(gate @ xt) * (up @ xt)
            out[t] += float(weights[t, k]) * (w_down[s].double() @ h)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    diff = (out.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def rows_in_two_rounds(backend, x, ids, w, gu, d):
    """As an engine with a small cache: experts in slots < S/2 first, the rest in a second call; rows of a
    pick not in the current round must survive it. Returns (combined output, rows)."""
    S = gu.shape[0]
    rows = torch.full((*ids.shape, x.shape[1]), 7.0, device=x.device)
    rows[ids < 0] = 0.0  # dropped picks are never written: the caller zeroes them
    first = torch.where(ids < S // 2, ids, -1)
    fused_moe_rows(x, first, w, gu, d, rows, backend=backend)
    assert torch.equal(rows[(ids >= S // 2)], torch.full_like(rows[(ids >= S // 2)], 7.0))
    fused_moe_rows(x, torch.where(ids >= S // 2, ids, -1), w, gu, d, rows, backend=backend)
    return combine_rows(rows, x.dtype), rows
