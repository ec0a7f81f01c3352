"""The decode step's small operations fused in Triton (contract and reference: fused_decode.py).

T tokens (rows), H hidden, N query heads, G KV heads, D head dim (HALF = D / 2), E experts, K top-k; *_PAD the
power-of-two tile sizes, masked past the real size.

1. rms_norm kernel, grid (T,): one program per row; with a residual it first writes h + delta (rounded to the
   model dtype, as torch's add) and normalises that. Float32 sum of squares, rsqrt, cast to the model dtype, then
   the weight multiply rounded again: the rounding points of layers.rms_norm.
2. qk kernel, grid (T,): one program per decode token takes its row of the fused q/k/v projection, clips, applies
   the QK norm (per head or over all heads), rotates q and k by the token's position (x * cos + rotate_half(x) *
   sin, every product and the sum rounded to the model dtype as torch rounds them), writes q for attention and
   k and v straight into the token's KV-cache row at its position.
3. route kernel, grid (T,): softmax of the router logits in float32, the top-k by repeated arg-max (ties to the
   lower expert id), optionally renormalised to sum to one, written into the route record's rows.

Nothing is read back to the host and every launch depends on shapes alone: each call can be captured in a CUDA
graph and replayed with new inputs.
"""

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _unit_stride(**tensors: torch.Tensor) -> None:
    """The kernels step through each tensor's last dimension one element at a time."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")


# ---------------------------------------------------------------------------------------------- rms norm


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, H, eps,
                     stride_x, stride_d, stride_s, stride_o,
                     HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + t * stride_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + t * stride_d + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + t * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = (xf * inv).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta or x, its RMSNorm) for x [T, H]; the first is x itself when delta is None."""
    T, H = x.shape
    if weight.shape != (H,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}, delta "
                         f"{None if delta is None else tuple(delta.shape)}")
    _unit_stride(x=x, weight=weight, **({} if delta is None else {"delta": delta}))
    out = torch.empty(T, H, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x) if delta is not None else x
    if T == 0:
        return total, out
    block = triton.next_power_of_2(H)
    with _device(x):
        _rms_norm_kernel[(T,)](
            x, delta if delta is not None else x, weight, total, out, H, eps,
            x.stride(0), (delta if delta is not None else x).stride(0), total.stride(0), out.stride(0),
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=_warps(block),
        )
    return total, out


# ---------------------------------------------------------------------------------------------- q, k, v


@triton.jit
def _add_rn(a, b, NO_FMA: tl.constexpr):
    """a + b in float32, never contracted with the product that made a or b. Compiled, LLVM narrows a float32
    product or sum of bfloat16 values rounded back to bfloat16 into a bfloat16 operation (exact), and then fuses
    the bfloat16 multiply and add into one fma: one rounding where torch rounds twice (up to 2 ulps apart on an
    H100, 2026-12-05). A PTX add with an explicit rounding mode is never fused, and without .ftz it keeps
    subnormals as torch does (libdevice's add_rn flushes them). The interpreter runs no PTX and never fuses:
    there NO_FMA is off."""
    if NO_FMA:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return a + b


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, DT: tl.constexpr, NO_FMA: tl.constexpr):
    """(first, second half) of x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), rounded as torch:
    each product to the model dtype, then the sum."""
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(DT)
    b1 = (-(x2.to(tl.float32)) * s1.to(tl.float32)).to(DT)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(DT)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(DT)
    return (_add_rn(a1.to(tl.float32), b1.to(tl.float32), NO_FMA).to(DT),
            _add_rn(a2.to(tl.float32), b2.to(tl.float32), NO_FMA).to(DT))


@triton.jit
def _clip(x, clip, DT: tl.constexpr):
    """x clamped to [-clip, clip], in the model dtype (torch's clamp: exact, the bound rounded to the dtype)."""
    return tl.minimum(tl.maximum(x, -clip), clip).to(DT)


@triton.jit
def _norm_halves(x1, x2, w_ptr, heads, dd, n_elems, eps, NORM: tl.constexpr, HEAD_STRIDE: tl.constexpr,
                 HALF: tl.constexpr, DT: tl.constexpr):
    """RMSNorm of [heads, D] held as two [heads, HALF] halves: per head (weight [D]) or over all (weight
    [heads * D]); cast to the model dtype before the weight multiply, as layers.rms_norm."""
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    sq = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)  # [heads]
    if NORM == 1:
        inv = tl.rsqrt(sq / n_elems + eps)[:, None]
        w_off = dd
    else:
        inv = tl.rsqrt(tl.sum(sq, axis=0) / n_elems + eps)
        w_off = heads * HEAD_STRIDE + dd
    y1 = (f1 * inv).to(DT)
    y2 = (f2 * inv).to(DT)
    w1 = tl.load(w_ptr + w_off)
    w2 = tl.load(w_ptr + w_off + HALF)
    return (w1.to(tl.float32) * y1.to(tl.float32)).to(DT), (w2.to(tl.float32) * y2.to(tl.float32)).to(DT)


@triton.jit
def _qk_kernel(
    qkv_ptr, pos_ptr, rows_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, q_ptr, kc_ptr, vc_ptr,
    eps, clip,
    stride_t, stride_cos, stride_q_t, stride_q_h,
    stride_kr, stride_kg, stride_km, stride_vr, stride_vg, stride_vm,
    N: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    N_PAD: tl.constexpr, G_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    NORM: tl.constexpr, CLIP: tl.constexpr, NO_FMA: tl.constexpr,
):
    DT: tl.constexpr = q_ptr.dtype.element_ty
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    row = tl.load(rows_ptr + t).to(tl.int64)
    dd = tl.arange(0, HALF_PAD)[None, :]
    d_ok = dd < HALF
    c1 = tl.load(cos_ptr + pos * stride_cos + dd, mask=d_ok, other=0.0)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + dd, mask=d_ok, other=0.0)
    s1 = tl.load(sin_ptr + pos * stride_cos + dd, mask=d_ok, other=0.0)
    s2 = tl.load(sin_ptr + pos * stride_cos + HALF + dd, mask=d_ok, other=0.0)
    base = qkv_ptr + t * stride_t

    # queries: heads 0..N-1 of the row
    qh = tl.arange(0, N_PAD)[:, None]
    q_ok = (qh < N) & d_ok
    q1 = tl.load(base + qh * D + dd, mask=q_ok, other=0.0)
    q2 = tl.load(base + qh * D + HALF + dd, mask=q_ok, other=0.0)
    if CLIP:
        q1, q2 = _clip(q1, clip, DT), _clip(q2, clip, DT)
    if NORM != 0:
        q1, q2 = _norm_halves(q1, q2, qn_ptr, tl.where(q_ok, qh, 0), tl.where(q_ok, dd, 0),
                              D if NORM == 1 else N * D, eps, NORM, D, HALF, DT)
    q1, q2 = _rotate(q1, q2, c1, c2, s1, s2, DT, NO_FMA)
    q_out = q_ptr + t * stride_q_t + qh * stride_q_h + dd
    tl.store(q_out, q1, mask=q_ok)
    tl.store(q_out + HALF, q2, mask=q_ok)

    # keys and values: heads N..N+G-1 and N+G..N+2G-1 of the row, into the cache at (row, g, pos)
    kh = tl.arange(0, G_PAD)[:, None]
    k_ok = (kh < G) & d_ok
    k1 = tl.load(base + (N + kh) * D + dd, mask=k_ok, other=0.0)
    k2 = tl.load(base + (N + kh) * D + HALF + dd, mask=k_ok, other=0.0)
    v1 = tl.load(base + (N + G + kh) * D + dd, mask=k_ok, other=0.0)
    v2 = tl.load(base + (N + G + kh) * D + HALF + dd, mask=k_ok, other=0.0)
    if CLIP:
        k1, k2 = _clip(k1, clip, DT), _clip(k2, clip, DT)
        v1, v2 = _clip(v1, clip, DT), _clip(v2, clip, DT)
    if NORM != 0:
        k1, k2 = _norm_halves(k1, k2, kn_ptr, tl.where(k_ok, kh, 0), tl.where(k_ok, dd, 0),
                              D if NORM == 1 else G * D, eps, NORM, D, HALF, DT)
    k1, k2 = _rotate(k1, k2, c1, c2, s1, s2, DT, NO_FMA)
    k_out = kc_ptr + row * stride_kr + kh * stride_kg + pos * stride_km + dd
    v_out = vc_ptr + row * stride_vr + kh * stride_vg + pos * stride_vm + dd
    tl.store(k_out, k1, mask=k_ok)
    tl.store(k_out + HALF, k2, mask=k_ok)
    tl.store(v_out, v1, mask=k_ok)
    tl.store(v_out + HALF, v2, mask=k_ok)


def qk_rope_store_triton(qkv, num_heads, num_kv_heads, head_dim, positions, rows, cos, sin, q_norm, k_norm,
                         norm_mode: int, eps: float, clip: float | None, k_cache, v_cache) -> torch.Tensor:
    """q [T, N, D] from qkv [T, (N + 2G) * D]; k and v written into the caches [R, G, M, D] (see the module)."""
    T = qkv.shape[0]
    N, G, D = num_heads, num_kv_heads, head_dim
    if qkv.shape[1] != (N + 2 * G) * D or D % 2 or k_cache.shape[1:] != (G, k_cache.shape[2], D):
        raise ValueError(f"qk_rope_store: qkv {tuple(qkv.shape)} and cache {tuple(k_cache.shape)} do not fit "
                         f"{N} query and {G} KV heads of {D} (an even head dim)")
    _unit_stride(qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache)
    q = torch.empty(T, N, D, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    half = D // 2
    dummy = cos  # an unused pointer argument where a family has no QK norm
    with _device(qkv):
        _qk_kernel[(T,)](
            qkv, positions, rows, cos, sin, q_norm if q_norm is not None else dummy,
            k_norm if k_norm is not None else dummy, q, k_cache, v_cache,
            eps, clip if clip is not None else 0.0,
            qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            N=N, G=G, D=D, HALF=half, N_PAD=triton.next_power_of_2(N), G_PAD=triton.next_power_of_2(G),
            HALF_PAD=triton.next_power_of_2(half), NORM=norm_mode, CLIP=clip is not None,
            NO_FMA=os.environ.get("TRITON_INTERPRET") != "1",
            num_warps=_warps(N * D),
        )
    return q


# ---------------------------------------------------------------------------------------------- router


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, w_ptr, E, stride_l, stride_i, stride_w,
                  K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    ok = e < E
    x = tl.load(logits_ptr + t * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, axis=0)
    left = tl.where(ok, p, -1.0)  # probabilities are >= 0: -1 marks taken or padding
    kk = tl.arange(0, K_PAD)
    vals = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.max(left, axis=0)
        at = tl.min(tl.where(left == best, e, E_PAD), axis=0)
        vals = tl.where(kk == k, best, vals)
        ids = tl.where(kk == k, at.to(tl.int64), ids)
        left = tl.where(e == at, -1.0, left)
    ids = tl.minimum(ids, E - 1)  # NaN logits match no maximum: keep the id in range (torch ranks NaN first)
    if NORMALIZE:
        vals = vals / tl.sum(vals, axis=0)
    k_ok = kk < K
    tl.store(ids_ptr + t * stride_i + kk, ids, mask=k_ok)
    tl.store(w_ptr + t * stride_w + kk, vals.to(w_ptr.dtype.element_ty), mask=k_ok)


def route_triton(logits: torch.Tensor, top_k: int, normalize: bool, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Write the top-k of softmax(logits [T, E]) into ids [T, K] (int64) and weights [T, K] (any float dtype)."""
    T, E = logits.shape
    if ids.shape != (T, top_k) or weights.shape != (T, top_k) or not 1 <= top_k <= E:
        raise ValueError(f"route: logits {tuple(logits.shape)}, top_k {top_k}, ids {tuple(ids.shape)}, "
                         f"weights {tuple(weights.shape)}")
    _unit_stride(logits=logits, ids=ids, weights=weights)
    if T == 0:
        return
    with _device(logits):
        _route_kernel[(T,)](
            logits, ids, weights, E, logits.stride(0), ids.stride(0), weights.stride(0),
            K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(E), NORMALIZE=normalize,
            num_warps=1 if E <= 128 else 4,
        )
