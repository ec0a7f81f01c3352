"""The fused decode kernels (models/fused_decode_triton.py) against the torch operations they replace, and the
model with `fused_ops` against the model without.

    python -m pytest tests/models/test_fused_decode.py                                   # CPU: the refusal
    python -m pytest tests/models/test_fused_decode.py -k compile                        # kernels build for sm_90
    TRITON_INTERPRET=1 python -m pytest tests/models/test_fused_decode.py -k interpret   # Triton kernels on CPU
    python -m pytest tests/models/test_fused_decode.py -m gpu                            # on a CUDA machine

The interpreter runs float32/float16 only (it multiplies bfloat16 as raw integers) and needs numpy < 2.4 with
triton 3.6; otherwise those tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch

from moeflow.architectures.spec import RouterSpec
from moeflow.errors import ConfigError
from moeflow.experts.kernels import triton_available
from moeflow.models.layers import Rotary, rms_norm
from moeflow.routing.router import route
from triton_tools import INTERPRET, compile_sm90, interpret, spilled_bytes

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton")
CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- references


def qk_reference(qkv, N, G, D, positions, rows, rotary, q_norm, k_norm, norm, eps, clip, k_cache, v_cache):
    """MoEModel._attention's decode path, written out: split, clip, QK norm, rotary, cache writes."""
    T = qkv.shape[0]
    q, k, v = qkv.split([N * D, G * D, G * D], dim=-1)
    if clip is not None:
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    if norm == "full":
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k, v = q.reshape(T, N, D), k.reshape(T, G, D), v.reshape(T, G, D)
    if norm == "per_head":
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    k_cache[rows, :, positions] = rotary.apply(k, positions)
    v_cache[rows, :, positions] = v
    return rotary.apply(q, positions)


def qk_case(T, N, G, D, norm, clip, dtype, device="cpu", seed=0, max_len=64):
    rows_total = T + 5  # rows the step does not write stay untouched
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = (2 * torch.randn(T, (N + 2 * G) * D, generator=gen, device=device)).to(dtype)
    width = {"none": 0, "per_head": D, "full": None}[norm]
    q_norm = k_norm = None
    if norm != "none":
        q_norm = (1 + 0.1 * torch.randn(width or N * D, generator=gen, device=device)).to(dtype)
        k_norm = (1 + 0.1 * torch.randn(width or G * D, generator=gen, device=device)).to(dtype)
    positions = torch.randint(0, max_len, (T,), generator=gen, device=device)
    rows = torch.randperm(rows_total, generator=gen, device=device)[:T]
    k_cache = torch.randn(rows_total, G, max_len, D, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(rows_total, G, max_len, D, generator=gen, device=device).to(dtype)
    rotary = Rotary(D, 10000.0, max_len, dtype, torch.device(device))
    return qkv, positions, rows, rotary, q_norm, k_norm, k_cache, v_cache


def check_qk(T, N, G, D, norm, clip, dtype, device="cpu", seed=0):
    from moeflow.models.fused_decode_triton import qk_rope_store_triton
    from moeflow.models.fused_decode import NORM_MODES

    qkv, pos, rows, rot, qn, kn, kc, vc = qk_case(T, N, G, D, norm, clip, dtype, device, seed)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = qk_reference(qkv, N, G, D, pos, rows, rot, qn, kn, norm, 1e-6, clip, kc_ref, vc_ref)
    out = qk_rope_store_triton(qkv, N, G, D, pos, rows, rot.cos, rot.sin, qn, kn, NORM_MODES[norm], 1e-6, clip, kc, vc)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    assert out.shape == (T, N, D) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(kc, kc_ref, **tol)
    assert torch.equal(vc, vc_ref), "values are copied, never rounded"
    untouched = torch.ones(kc.shape[0], kc.shape[2], dtype=torch.bool, device=device)
    untouched[rows, pos] = False
    assert torch.equal(kc.permute(0, 2, 1, 3)[untouched], kc_ref.permute(0, 2, 1, 3)[untouched])
    if norm == "none" and clip is None:  # no float32 reduction in the way: the same bits as torch
        assert torch.equal(out, ref) and torch.equal(kc, kc_ref)


def check_norm(T, H, dtype, with_delta, device="cpu", seed=0):
    from moeflow.models.fused_decode_triton import rms_norm_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    x = (3 * torch.randn(T, H, generator=gen, device=device)).to(dtype)
    delta = torch.randn(T, H, generator=gen, device=device).to(dtype) if with_delta else None
    w = (1 + 0.1 * torch.randn(H, generator=gen, device=device)).to(dtype)
    total, out = rms_norm_triton(x, w, 1e-6, delta)
    want_total = x + delta if with_delta else x
    assert torch.equal(total, want_total), "the residual add rounds as torch's"
    ref = rms_norm(want_total, w, 1e-6)
    assert out.dtype == ref.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    if dtype != torch.float32:  # a float32 scale one ulp apart rarely moves a half-precision rounding
        assert (out == ref).float().mean() > 0.98, "only a float32 reduction's order may differ"


def check_route(T, E, K, normalize, weight_dtype, device="cpu", seed=0):
    from moeflow.models.fused_decode_triton import route_triton

    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (2 * torch.randn(T, E, generator=gen, device=device)).to(torch.float32)  # distinct: no ties
    spec = RouterSpec(K, normalize, weight_dtype != torch.float32)
    ref = route(logits, spec)
    ids = torch.full((T, K), -7, dtype=torch.int64, device=device)
    weights = torch.full((T, K), float("nan"), dtype=weight_dtype, device=device)
    route_triton(logits, K, normalize, ids, weights)
    assert torch.equal(ids, ref.ids), "the same experts in the same (descending) order"
    tol = dict(atol=1e-6, rtol=1e-5) if weight_dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(weights, ref.weights.to(weight_dtype), **tol)


# ---------------------------------------------------------------------------------------------- CPU


def test_fused_ops_refused_where_the_kernels_cannot_run(checkpoint, monkeypatch):
    from moeflow.config import EngineConfig
    from moeflow.engine.engine import LLMEngine

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="fused_ops needs Triton and a CUDA device"):
        LLMEngine(EngineConfig(model=str(checkpoint("qwen3_moe")), device="cpu", fused_ops=True))


def test_fused_ops_default_where_the_kernels_run(checkpoint, monkeypatch):
    """The default (None) fuses on CUDA with Triton and nowhere else: on the CPU it runs plain torch, not the
    interpreter, even where the interpreter could run the kernels."""
    from moeflow.config import EngineConfig
    from moeflow.engine.engine import LLMEngine

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    engine = LLMEngine(EngineConfig(model=str(checkpoint("qwen3_moe")), device="cpu"))
    assert engine.model.fused is False and engine.model.qkv == {}
    if CUDA and triton_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        engine = LLMEngine(EngineConfig(model=str(checkpoint("qwen3_moe")), device="cuda"))
        assert engine.model.fused is True and engine.model.qkv


# ---------------------------------------------------------------------------------------------- interpreter


@interpret
@pytest.mark.parametrize("T,H", [(3, 160), (2, 64), (1, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_interpret_rms_norm(T, H, dtype, with_delta):
    check_norm(T, H, dtype, with_delta, seed=T * H)


@interpret
@pytest.mark.parametrize("T,N,G,D", [(3, 4, 2, 40), (2, 16, 4, 128), (4, 6, 6, 16)])
@pytest.mark.parametrize("norm,clip", [("none", None), ("per_head", None), ("full", 1.5), ("none", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpret_qk_rope_store(T, N, G, D, norm, clip, dtype):
    check_qk(T, N, G, D, norm, clip, dtype, seed=N + D)


@interpret
@pytest.mark.parametrize("T,E,K", [(5, 32, 4), (3, 60, 8), (2, 8, 2), (4, 128, 8)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
def test_interpret_route(T, E, K, normalize, weight_dtype):
    check_route(T, E, K, normalize, weight_dtype, seed=E + K)


def _generate(model_dir, fused: bool, steps: int = 6):
    from moeflow.llm import LLM
    from moeflow.sampling import SamplingParams

    llm = LLM(str(model_dir), device="cpu", dtype="float32", fused_ops=fused, max_num_seqs=3)
    prompts = ["the cat sat on", "a b c d e f g", "hello"]
    out = llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=0))
    return [(o.outputs[0].token_ids, [max(d.values()) for d in o.outputs[0].logprobs]) for o in out]


@interpret
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe"])
def test_interpret_model_with_fused_ops_decodes_as_without(checkpoint, family):
    """Three sequences of different lengths, prefill and decode: the same greedy tokens with their
    log-probabilities to float32 rounding, for each family's QK norm, clip and bias."""
    with_ops = _generate(checkpoint(family), fused=True)
    without = _generate(checkpoint(family), fused=False)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(with_ops, without):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-4, rtol=1e-4)


@needs_triton
def test_launchers_refuse_shapes_and_layouts_the_kernels_cannot_read():
    from moeflow.models import fused_decode_triton as k

    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="rms_norm"):
        k.rms_norm_triton(x, torch.ones(6), 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        k.rms_norm_triton(torch.zeros(8, 4).t(), torch.ones(8), 1e-6)
    qkv, pos, rows, rot, qn, kn, kc, vc = qk_case(2, 4, 2, 16, "none", None, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        k.qk_rope_store_triton(qkv, 4, 1, 16, pos, rows, rot.cos, rot.sin, None, None, 0, 1e-6, None, kc, vc)
    ids, weights = torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="route"):
        k.route_triton(torch.zeros(3, 8), 4, True, ids, weights)


# ---------------------------------------------------------------------------------------------- compiled


def half_precision_fma(compiled) -> list[str]:
    """The PTX's fused multiply-adds in bfloat16 or float16: each rounds once where torch, multiplying and then
    adding in the model dtype, rounds twice."""
    return sorted({line.split()[0] for line in compiled.asm["ptx"].splitlines()
                   if line.strip().startswith("fma.") and "16" in line.split()[0]})


@needs_triton
@pytest.mark.parametrize("dtype,H", [("bf16", 2048), ("bf16", 4096), ("fp16", 160), ("fp32", 2048)])
def test_rms_norm_kernel_compiles_for_the_h200(dtype, H, tmp_path):
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    from moeflow.models import fused_decode_triton as k

    block = 1 << (H - 1).bit_length()
    for delta in (False, True):
        args = {"x_ptr": f"*{dtype}", "delta_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "sum_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}", "H": H, "eps": "fp32", "stride_x": H, "stride_d": H, "stride_s": H,
                "stride_o": H}
        compiled = compile_sm90(k._rms_norm_kernel, args, {"HAS_DELTA": delta, "BLOCK": block},
                                num_warps=k._warps(block), num_stages=1)
        assert spilled_bytes(compiled, tmp_path) == 0
        assert not half_precision_fma(compiled), "a product and a sum torch rounds apart were fused"


@needs_triton
@pytest.mark.parametrize("dtype,N,G,D,norm,clip", [
    ("bf16", 16, 4, 128, 1, False),  # the bench model (Qwen3 shapes)
    ("bf16", 32, 4, 128, 1, False),  # Qwen3-30B-A3B
    ("bf16", 32, 8, 128, 0, False),  # Mixtral
    ("bf16", 16, 16, 128, 2, True),  # OLMoE: QK norm over all heads, clip
    ("fp32", 4, 2, 40, 1, False),  # the bundled tiny model in float32
])
def test_qk_kernel_compiles_for_the_h200(dtype, N, G, D, norm, clip, tmp_path):
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    from moeflow.models import fused_decode_triton as k

    p2 = lambda n: 1 << (n - 1).bit_length()  # noqa: E731
    M = 4096
    args = {"qkv_ptr": f"*{dtype}", "pos_ptr": "*i64", "rows_ptr": "*i64", "cos_ptr": f"*{dtype}",
            "sin_ptr": f"*{dtype}", "qn_ptr": f"*{dtype}", "kn_ptr": f"*{dtype}", "q_ptr": f"*{dtype}",
            "kc_ptr": f"*{dtype}", "vc_ptr": f"*{dtype}", "eps": "fp32", "clip": "fp32",
            "stride_t": (N + 2 * G) * D, "stride_cos": D, "stride_q_t": N * D, "stride_q_h": D,
            "stride_kr": G * M * D, "stride_kg": M * D, "stride_km": D,
            "stride_vr": G * M * D, "stride_vg": M * D, "stride_vm": D}
    constexprs = {"N": N, "G": G, "D": D, "HALF": D // 2, "N_PAD": p2(N), "G_PAD": p2(G), "HALF_PAD": p2(D // 2),
                  "NORM": norm, "CLIP": clip, "NO_FMA": True}
    compiled = compile_sm90(k._qk_kernel, args, constexprs, num_warps=k._warps(N * D), num_stages=1)
    assert spilled_bytes(compiled, tmp_path) == 0
    # torch rounds the rotary's products and then their sum (on 2026-12-05 the H100 found the kernel up to 2
    # bfloat16 ulps off torch's where the compiler had fused them)
    assert not half_precision_fma(compiled), "the rotary's product and sum were fused"


@needs_triton
@pytest.mark.parametrize("E,K,wdt", [(64, 8, "fp32"), (128, 8, "bf16"), (8, 2, "bf16"), (160, 6, "fp32")])
def test_route_kernel_compiles_for_the_h200(E, K, wdt, tmp_path):
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    from moeflow.models import fused_decode_triton as k

    e_pad = 1 << (E - 1).bit_length()
    args = {"logits_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": f"*{wdt}", "E": E, "stride_l": E, "stride_i": K,
            "stride_w": K}
    compiled = compile_sm90(k._route_kernel, args, {"K": K, "K_PAD": 1 << (K - 1).bit_length(), "E_PAD": e_pad,
                                                   "NORMALIZE": True}, num_warps=1 if E <= 128 else 4, num_stages=1)
    assert spilled_bytes(compiled, tmp_path) == 0


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not triton_available(), reason="needs a CUDA device and Triton")
def test_gpu_kernels_match_torch_in_bfloat16():
    for T, H in [(1, 2048), (64, 2048), (7, 160)]:
        for delta in (False, True):
            check_norm(T, H, torch.bfloat16, delta, device="cuda", seed=T)
    for norm, clip in [("per_head", None), ("full", 2.0), ("none", None)]:
        check_qk(32, 16, 4, 128, norm, clip, torch.bfloat16, device="cuda")
    for E, K in [(64, 8), (128, 8), (8, 2)]:
        check_route(64, E, K, True, torch.float32, device="cuda")
        check_route(64, E, K, False, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not triton_available(), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe"])
def test_gpu_engine_with_fused_ops_decodes_as_without(checkpoint, family):
    """float32 on CUDA with decode graphs, at a quarter of the experts: greedy tokens of the fused engine
    against the unfused one over 12 steps (the two differ only in the order of float32 sums, so on random
    weights a near tie may still flip late: the first two thirds must agree)."""
    from moeflow.llm import LLM
    from moeflow.sampling import SamplingParams

    outs = []
    for fused in (True, False):
        llm = LLM(str(checkpoint(family)), device="cuda", dtype="float32", fused_ops=fused, max_num_seqs=4,
                  expert_budget="25%")
        assert llm.engine.runner.graphs is not None, "decode runs as CUDA graphs"
        out = llm.generate(["the cat sat on", "a b c d e f g", "hello", "one two"],
                           SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        outs.append([o.outputs[0].token_ids for o in out])
        del llm
    for a, b in zip(*outs):
        assert a[:8] == b[:8]
