"""Expert compute over the slot pool, on the CPU: every backend against the plain-torch reference, the kernels'
checks and tile choices, and the Triton kernels built for sm_90 (test_kernels_triton.py runs them).

T tokens, K top-k, H hidden, I expert width, S slots.

    python -m pytest tests/experts/test_kernels.py                                   # CPU (always)
    python -m pytest tests/experts/test_kernels.py -k compile                        # kernels build for sm_90
"""

import math

import pytest
import torch

from kernel_cases import DTYPES, make_case, naive_dense, pool_views, rel_err, rows_in_two_rounds
from triton_tools import INTERPRET, compile_sm90
from moeflow.experts.kernels import fused_moe, fused_moe_rows, resolve_backend
from moeflow.experts.kernels.grouped import moe_grouped, slot_groups
from moeflow.experts.kernels.reference import moe_reference


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("T,K,H,I,S", [(1, 1, 16, 8, 1), (3, 2, 32, 16, 6), (7, 4, 24, 40, 9), (17, 2, 64, 32, 5)])
def test_reference_matches_naive_dense(T, K, H, I, S):
    x, ids, w, pool = make_case(T, K, H, I, S, seed=T)
    gu, d = pool_views(pool, H, I)
    out = moe_reference(x, ids, w, gu, d)
    assert out.dtype == x.dtype and out.shape == (T, H)
    assert rel_err(out, naive_dense(x, ids, w, gu, d)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_precision_close_to_float32(dtype):
    x, ids, w, pool = make_case(9, 2, 64, 32, 6, dtype, seed=3)
    gu, d = pool_views(pool, 64, 32)
    out = moe_reference(x, ids, w.to(dtype), gu, d)
    ref = moe_reference(x.float(), ids, w, gu.float(), d.float())
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("T,K,H,I,S", [(1, 1, 16, 8, 1), (3, 2, 32, 16, 6), (17, 4, 64, 32, 9), (40, 8, 32, 16, 8)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_grouped_matches_reference_cpu(T, K, H, I, S, ids_dtype):
    x, ids, w, pool = make_case(T, K, H, I, S, seed=T + K, ids_dtype=ids_dtype)
    gu, d = pool_views(pool, H, I)
    ref = moe_reference(x, ids, w, gu, d)
    out = moe_grouped(x, ids, w, gu, d)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_dropped_picks_contribute_zero(backend):
    x, ids, w, pool = make_case(6, 2, 32, 16, 5, drop=0.0, seed=1)
    gu, d = pool_views(pool, 32, 16)
    ids[2] = -1  # a token with every pick dropped
    ids[4, 1] = -1
    out = fused_moe(x, ids, w, gu, d, backend=backend)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    kept = ids.clone()
    kept[4, 1] = kept[4, 0]  # same as keeping only pick 0 of token 4 with its weight
    w_kept = w.clone()
    w_kept[4, 1] = 0.0
    torch.testing.assert_close(out[4], fused_moe(x, kept, w_kept, gu, d, backend=backend)[4], rtol=1e-6, atol=1e-7)
    all_dropped = torch.full_like(ids, -1)
    assert torch.equal(fused_moe(x, all_dropped, w, gu, d, backend=backend), torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_zero_token_slots_and_repeated_slots(backend):
    S, H, I = 12, 32, 16
    x, _, w, pool = make_case(5, 2, H, I, S, seed=2)
    gu, d = pool_views(pool, H, I)
    ids = torch.tensor([[3, 3], [3, 7], [11, 3], [7, -1], [0, 11]])  # 8 of 12 slots unused, token 0 repeats slot 3
    out = fused_moe(x, ids, w, gu, d, backend=backend)
    assert rel_err(out, naive_dense(x, ids, w, gu, d)) < 1e-6


def test_empty_batch():
    x, ids, w, pool = make_case(0, 2, 32, 16, 4)
    gu, d = pool_views(pool, 32, 16)
    for backend in ("reference", "grouped"):
        out = fused_moe(x, ids, w, gu, d, backend=backend)
        assert out.shape == (0, 32)


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_strided_pool_views_match_contiguous_copies(backend):
    x, ids, w, pool = make_case(7, 2, 32, 16, 6, seed=4)
    gu, d = pool_views(pool, 32, 16)
    assert not gu.is_contiguous() and gu.stride(0) == 3 * 16 * 32 and gu.data_ptr() == pool.data_ptr()
    out = fused_moe(x, ids, w, gu, d, backend=backend)
    assert torch.equal(out, fused_moe(x, ids, w, gu.contiguous(), d.contiguous(), backend=backend))


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_slot_permutation_is_bitwise_invisible(backend):
    """The same experts in other slots (another cache state) give the bitwise same output: exact mode."""
    S, H, I = 8, 32, 16
    x, ids, w, pool = make_case(9, 4, H, I, S, seed=5)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(9))  # expert e moves to slot perm[e]
    moved = torch.empty_like(pool)
    moved[perm] = pool
    moved_ids = torch.where(ids >= 0, perm[ids.clamp(min=0)], -1)
    out = fused_moe(x, ids, w, *pool_views(pool, H, I), backend=backend)
    out_moved = fused_moe(x, moved_ids, w, *pool_views(moved, H, I), backend=backend)
    assert torch.equal(out, out_moved)


def test_noncontiguous_inputs():
    x, ids, w, pool = make_case(6, 3, 32, 16, 5, seed=6)
    gu, d = pool_views(pool, 32, 16)
    x_nc = torch.stack([x, torch.full_like(x, float("nan"))], dim=2).flatten(1)[:, ::2]  # stride (2H, 2)
    ids_t = ids.t().contiguous().t()  # column-major ids
    for backend in ("reference", "grouped"):
        out = fused_moe(x_nc, ids_t, w.t().contiguous().t(), gu, d, backend=backend)
        assert torch.equal(out, fused_moe(x, ids, w, gu, d, backend=backend))


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_rows_over_rounds_equal_one_fused_call(backend):
    x, ids, w, pool = make_case(11, 4, 32, 16, 8, seed=7)
    gu, d = pool_views(pool, 32, 16)
    out, rows = rows_in_two_rounds(backend, x, ids, w, gu, d)
    assert not (rows == 7.0).any()
    assert torch.equal(out, fused_moe(x, ids, w, gu, d, backend=backend))


def test_rows_validation():
    x, ids, w, pool = make_case(4, 2, 32, 16, 5)
    gu, d = pool_views(pool, 32, 16)
    for bad in (torch.zeros(4, 2, 32, dtype=torch.bfloat16), torch.zeros(4, 3, 32), torch.zeros(2, 4, 32).transpose(0, 1)):
        with pytest.raises(ValueError, match="rows must be"):
            fused_moe_rows(x, ids, w, gu, d, bad, backend="reference")


def test_slot_groups_offsets():
    ids = torch.tensor([[2, 0], [2, -1], [4, 2]])
    order, valid, offs = slot_groups(ids, S=5)
    assert offs.dtype == torch.int32 and offs.tolist() == [1, 1, 4, 4, 5]
    assert order.tolist()[:5] == [1, 0, 2, 5, 4] and order.tolist()[5] == 3  # stable; the dropped pick last
    assert valid.tolist() == [True] * 5 + [False]


def test_input_validation():
    x, ids, w, pool = make_case(4, 2, 32, 16, 5)
    gu, d = pool_views(pool, 32, 16)
    with pytest.raises(ValueError, match="slot_ids must lie"):
        moe_reference(x, torch.full_like(ids, 5), w, gu, d)
    with pytest.raises(ValueError, match="slot_ids must lie"):
        moe_reference(x, torch.full_like(ids, -2), w, gu, d)
    with pytest.raises(ValueError, match="weights must be"):
        moe_reference(x, ids, w[:, :1], gu, d)
    with pytest.raises(ValueError, match="w_down"):
        moe_reference(x, ids, w, gu, d[:, :, :8])
    with pytest.raises(ValueError, match="dtype"):
        moe_reference(x, ids, w, gu.double(), d.double())
    with pytest.raises(ValueError, match="int32 or int64"):
        moe_reference(x, ids.float(), w, gu, d)


def test_grouped_rejects_misaligned_shapes_instead_of_copying():
    x, ids, w, pool = make_case(4, 2, 30, 16, 5)  # H=30 floats: rows are not 16-byte multiples
    gu, d = pool_views(pool, 30, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        moe_grouped(x, ids, w, gu, d)


def test_resolve_backend_on_cpu():
    x = torch.zeros(1, 8)
    assert resolve_backend(x, "auto") == "reference"
    assert resolve_backend(x, "grouped") == "grouped"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(x, "cutlass")
    if not INTERPRET:
        with pytest.raises(ValueError, match="triton"):
            resolve_backend(x, "triton")


def test_auto_backend_is_reference_on_cpu():
    x, ids, w, pool = make_case(5, 2, 32, 16, 6)
    gu, d = pool_views(pool, 32, 16)
    assert torch.equal(fused_moe(x, ids, w, gu, d), moe_reference(x, ids, w, gu, d))


def test_block_bound_covers_every_count_distribution():
    triton_moe = pytest.importorskip("moeflow.experts.kernels.triton_moe")
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        S = int(torch.randint(1, 40, (1,), generator=gen))
        M = int(torch.randint(1, 300, (1,), generator=gen))
        bm = [16, 32, 64][int(torch.randint(0, 3, (1,), generator=gen))]
        skew = torch.rand(S, generator=gen) ** 4  # from one hot slot to an even spread
        counts = torch.bincount(torch.multinomial(skew, M, replacement=True, generator=gen), minlength=S)
        used = sum(math.ceil(c / bm) for c in counts.tolist())
        assert used <= triton_moe.num_blocks(M, S, bm)
    assert triton_moe.num_blocks(8, 128, 16) == 8  # decode: one block per pick


def test_pick_config_fits_shared_memory():
    triton_moe = pytest.importorskip("moeflow.experts.kernels.triton_moe")
    for M, S in [(1, 128), (8, 128), (512, 128), (4096, 128), (16384, 128), (16384, 8)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cfg = triton_moe.pick_config(M, S, 2048, 768, dtype)
            elt = 4 if dtype == torch.float32 else 2
            smem1 = cfg.stages1 * (cfg.block_m * cfg.block_k1 + 2 * cfg.block_k1 * cfg.block_n1) * elt
            smem2 = cfg.stages2 * (cfg.block_m * cfg.block_k2 + cfg.block_k2 * cfg.block_n2) * elt
            assert max(smem1, smem2) <= 160 * 1024 and min(cfg.stages1, cfg.stages2) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
@pytest.mark.parametrize("M,block_m", [(8, None), (16384, None), (512, None), (512, 32)])
def test_triton_kernels_compile_for_sm90(dtype_name, M, block_m):
    """Catches compile errors (and shared-memory overuse) in the GPU kernels on a CPU-only machine. block_m: the
    decode tiles made taller (with_block_m), as tools/moe_tile_time.py times them."""
    pytest.importorskip("triton")
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    import moeflow.experts.kernels.triton_moe as tm

    H, I, S, K = 2048, 768, 128, 8
    dtype = DTYPES[dtype_name]
    cfg = tm.pick_config(M, S, H, I, dtype)
    if block_m is not None:
        cfg = tm.with_block_m(cfg, block_m, dtype)
        assert cfg.block_m == block_m
    ty = f"*{dtype_name}"
    common = dict(sorted_ids_ptr="*i32", block_slot_ptr="*i32", M=M, K_top=K, H=H, I=I)
    k1 = compile_sm90(
        tm._gate_up_kernel,
        dict(common, x_ptr=ty, w_ptr=ty, h_ptr=ty, stride_xt=H, stride_xh=1, stride_ws=3 * I * H,
             stride_wn=H, stride_wh=1, stride_hm=I),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1, IEEE=dtype == torch.float32),
        cfg.warps1, cfg.stages1,
    )
    k2 = compile_sm90(
        tm._down_kernel,
        dict(common, h_ptr=ty, w_ptr=ty, rw_ptr="*fp32", rows_ptr="*fp32", stride_hm=I, stride_ws=3 * I * H,
             stride_wn=I, stride_wi=1, stride_rt=K, stride_rk=1, stride_om=H),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2, IEEE=dtype == torch.float32),
        cfg.warps2, cfg.stages2,
    )
    assert max(k1.metadata.shared, k2.metadata.shared) <= 227 * 1024
    if M == 8:  # the small kernels once per dtype
        compile_sm90(tm._combine_kernel, dict(rows_ptr="*fp32", slot_ptr="*i64", out_ptr=ty, K_top=K, H=H, S=S,
                      stride_st=K, stride_sk=1, stride_rm=H, stride_ot=H), dict(BLOCK_H=1024), 4, 3)
        compile_sm90(tm._count_kernel, dict(slot_ptr="*i64", counts_ptr="*i32", rank_ptr="*i32", M=M, S=S),
                      dict(BLOCK=1024), 4, 3)
        compile_sm90(tm._place_kernel, dict(slot_ptr="*i32", rank_ptr="*i32", pstart_ptr="*i32",
                      sorted_ids_ptr="*i32", M=M, S=S), dict(BLOCK=1024), 4, 3)
        compile_sm90(tm._offsets_kernel, dict(counts_ptr="*i32", pstart_ptr="*i32", block_slot_ptr="*i32",
                      sorted_ids_ptr="*i32", S=S, NB=8, EM=128, M=M),
                      dict(BLOCK_M=16, S_PAD=128, BLOCK_B=32, BLOCK_FILL=1024), 4, 3)
