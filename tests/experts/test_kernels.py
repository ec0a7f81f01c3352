"""Expert compute over the slot pool: every backend against the plain-torch reference.

T tokens, K top-k, H hidden, I expert width, S slots.

    python -m pytest tests/experts/test_kernels.py                                   # CPU (always)
    python -m pytest tests/experts/test_kernels.py -k compile                        # kernels build for sm_90
    TRITON_INTERPRET=1 python -m pytest tests/experts/test_kernels.py -k interpret   # Triton kernels on CPU
    python -m pytest tests/experts/test_kernels.py -m gpu                            # on a CUDA machine

The interpreter runs float32/float16 only (it multiplies bfloat16 as raw integers) and needs numpy < 2.4 with
triton 3.6 (triton-lang/triton#9171); otherwise those tests skip and say why.
"""

import math

import pytest
import torch

from triton_tools import INTERPRET, compile_sm90, interpret
from moeflow.experts.kernels import combine_rows, fused_moe, fused_moe_rows, resolve_backend
from moeflow.experts.kernels.grouped import moe_grouped, slot_groups
from moeflow.experts.kernels.reference import moe_reference

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- helpers


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


def _rows_in_two_rounds(backend, x, ids, w, gu, d):
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


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_rows_over_rounds_equal_one_fused_call(backend):
    x, ids, w, pool = make_case(11, 4, 32, 16, 8, seed=7)
    gu, d = pool_views(pool, 32, 16)
    out, rows = _rows_in_two_rounds(backend, x, ids, w, gu, d)
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
@pytest.mark.parametrize("M", [8, 16384])
def test_triton_kernels_compile_for_sm90(dtype_name, M):
    """Catches compile errors (and shared-memory overuse) in the GPU kernels on a CPU-only machine."""
    pytest.importorskip("triton")
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    import moeflow.experts.kernels.triton_moe as tm

    H, I, S, K = 2048, 768, 128, 8
    dtype = _DTYPES[dtype_name]
    cfg = tm.pick_config(M, S, H, I, dtype)
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


# ---------------------------------------------------------------------------------------------- interpreter

def _interp_config(bm):
    from moeflow.experts.kernels.triton_moe import TileConfig

    return {
        16: TileConfig(16, 32, 128, 4, 4, 32, 128, 4, 4),
        32: TileConfig(32, 64, 64, 4, 4, 64, 64, 4, 4),
        64: TileConfig(64, 64, 64, 4, 4, 128, 64, 4, 4),
    }[bm]


@interpret
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bm", [16, 32])
def test_interpret_align_layout(bm, ids_dtype):
    from moeflow.experts.kernels.triton_moe import align_pairs, num_blocks

    S, T, K = 6, 13, 2
    _, ids, _, _ = make_case(T, K, 32, 16, S, drop=0.3, seed=bm, ids_dtype=ids_dtype)
    ids[0, 0] = S + 3  # out of range: the kernels drop it rather than read out of bounds
    flat = ids.reshape(-1)
    M = flat.numel()
    sorted_ids, block_slot = align_pairs(flat, S, bm)
    assert block_slot.numel() == num_blocks(M, S, bm) and sorted_ids.numel() == block_slot.numel() * bm
    live = [(i, int(s)) for i, s in enumerate(flat.tolist()) if 0 <= s < S]
    placed = {}
    for b, slot in enumerate(block_slot.tolist()):
        rows = sorted_ids[b * bm : (b + 1) * bm].tolist()
        if slot < 0:
            assert all(r == M for r in rows)
            continue
        for r in rows:
            if r != M:
                assert r not in placed and int(flat[r]) == slot
                placed[r] = slot
    assert placed == dict(live)
    active = [s for s in block_slot.tolist() if s >= 0]
    assert active == sorted(active)  # blocks laid out slot by slot
    assert all(s == -1 for s in block_slot.tolist()[len(active) :])  # then the unused tail


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,K,H,I,S", [(1, 2, 32, 16, 6), (3, 2, 32, 16, 6), (5, 2, 32, 16, 6), (5, 2, 40, 24, 6)])
def test_interpret_triton_matches_reference(T, K, H, I, S, dtype):
    from moeflow.experts.kernels.triton_moe import moe_triton

    x, ids, w, pool = make_case(T, K, H, I, S, dtype, seed=T * 7 + H)
    gu, d = pool_views(pool, H, I)
    out = moe_triton(x, ids, w, gu, d, poison=True)
    ref = moe_reference(x.float(), ids, w, gu.float(), d.float())
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@interpret
def test_interpret_a_layers_slice_of_the_pool_with_the_pools_tiles_is_bitwise_the_whole_pool():
    """What a fully resident layer runs (compute.py): its experts' slice of the pool, expert ids as slot ids, tiles
    chosen for the whole pool, against the whole pool with the slot ids of that slice."""
    T, K, H, I, E, layers = 9, 2, 32, 16, 6, 3
    x, ids, w, pool = make_case(T, K, H, I, E * layers, seed=5, drop=0.0)
    ids = ids % E  # this layer's expert ids
    gu, d = pool_views(pool, H, I)
    li = 1
    whole = fused_moe(x, ids + li * E, w, gu, d, backend="triton")
    sliced = fused_moe(x, ids, w, gu[li * E : (li + 1) * E], d[li * E : (li + 1) * E], backend="triton",
                       tile_slots=E * layers)
    assert torch.equal(sliced, whole)


@interpret
@pytest.mark.parametrize("bm", [16, 32, 64])
def test_interpret_many_pairs_per_slot_and_partial_tiles(bm):
    """Several BM-blocks per slot, a slot with no pairs, dropped picks, H and I off every tile size."""
    from moeflow.experts.kernels.triton_moe import moe_triton

    T, K, H, I, S = 37, 2, 72, 40, 6
    x, _, w, pool = make_case(T, K, H, I, S, seed=bm)
    gu, d = pool_views(pool, H, I)
    gen = torch.Generator().manual_seed(bm)
    ids = torch.tensor([0, 2, 5])[torch.randint(0, 3, (T, K), generator=gen)]
    ids[::5, 1] = -1
    out = moe_triton(x, ids.to(torch.int32), w, gu, d, config=_interp_config(bm), poison=True)
    ref = moe_reference(x, ids, w, gu, d)
    assert rel_err(out, ref) < 1e-5


@interpret
def test_interpret_slot_permutation_is_bitwise_invisible():
    from moeflow.experts.kernels.triton_moe import moe_triton

    S, H, I = 6, 32, 16
    x, ids, w, pool = make_case(5, 2, H, I, S, seed=11)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(3))
    moved = torch.empty_like(pool)
    moved[perm] = pool
    moved_ids = torch.where(ids >= 0, perm[ids.clamp(min=0)], -1)
    out = moe_triton(x, ids, w, *pool_views(pool, H, I))
    assert torch.equal(out, moe_triton(x, moved_ids, w, *pool_views(moved, H, I)))


@interpret
def test_interpret_rows_over_rounds_equal_one_fused_call():
    x, ids, w, pool = make_case(11, 4, 32, 16, 8, seed=7)
    gu, d = pool_views(pool, 32, 16)
    out, rows = _rows_in_two_rounds("triton", x, ids, w, gu, d)
    assert not (rows == 7.0).any()
    assert torch.equal(out, fused_moe(x, ids, w, gu, d, backend="triton"))
    assert rel_err(out, moe_reference(x, ids, w, gu, d)) < 1e-5


@interpret
def test_interpret_dispatch_and_edge_cases():
    H, I, S = 32, 16, 6
    x, ids, w, pool = make_case(4, 2, H, I, S, seed=12)
    gu, d = pool_views(pool, H, I)
    assert resolve_backend(x, "triton") == "triton"
    ref = moe_reference(x, ids, w, gu, d)
    assert rel_err(fused_moe(x, ids, w, gu, d, backend="triton"), ref) < 1e-5
    x_nc = torch.stack([x, torch.full_like(x, float("nan"))], dim=2).flatten(1)[:, ::2]
    assert rel_err(fused_moe(x_nc, ids.t().contiguous().t(), w, gu, d, backend="triton"), ref) < 1e-5
    dropped = torch.full_like(ids, -1)
    assert torch.equal(fused_moe(x, dropped, w, gu, d, backend="triton"), torch.zeros_like(x))
    assert fused_moe(x[:0], ids[:0], w[:0], gu, d, backend="triton").shape == (0, H)


# ---------------------------------------------------------------------------------------------- GPU

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HIS = [(h, i, s) for h in (256, 2048) for i in (128, 768) for s in (8, 64, 130)]


def _gpu_grid():
    """Every (dtype, T, K) with the (H, I, S) combinations rotating through them: 60 cases cover each
    value of every axis many times (and all three tile configs) without the 360-case product."""
    cases = []
    n = 0
    for name in _DTYPES:
        for T in (1, 3, 16, 64, 257):
            for K in (1, 2, 4, 8):
                H, I, S = _HIS[(n * 5) % len(_HIS)]
                n += 1
                cases.append(pytest.param(name, T, K, H, I, S, id=f"{name}-T{T}-K{K}-H{H}-I{I}-S{S}"))
    for name in _DTYPES:  # make sure every dtype meets the mid (BM=32) and prefill (BM=64) tile configs
        cases.append(pytest.param(name, 64, 4, 256, 128, 8, id=f"{name}-T64-K4-H256-I128-S8-bm32"))
        cases.append(pytest.param(name, 257, 8, 2048, 768, 8, id=f"{name}-T257-K8-H2048-I768-S8-bm64"))
    cases.append(pytest.param("bf16", 33, 4, 200, 72, 20, id="bf16-T33-K4-H200-I72-S20-partial-tiles"))
    cases.append(pytest.param("fp16", 5, 1, 2048, 768, 1, id="fp16-T5-K1-H2048-I768-S1"))
    return cases


def _call_backend(backend, x, ids, w, gu, d):
    if backend == "triton":
        from moeflow.experts.kernels.triton_moe import moe_triton

        return moe_triton(x, ids, w, gu, d, poison=True)
    try:
        return moe_grouped(x, ids, w, gu, d)
    except RuntimeError as exc:  # this torch's CUDA _grouped_mm may take bfloat16 only
        if x.dtype != torch.bfloat16:
            pytest.skip(f"torch {torch.__version__} _grouped_mm rejects {x.dtype} on CUDA: {exc}")
        raise


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "grouped"])
@pytest.mark.parametrize("dtype_name,T,K,H,I,S", _gpu_grid())
def test_gpu_matches_reference(backend, dtype_name, T, K, H, I, S):
    dtype = _DTYPES[dtype_name]
    x, ids, w, pool = make_case(T, K, H, I, S, dtype, "cuda", seed=T * 1000 + K * 100 + S, drop=0.15)
    gu, d = pool_views(pool, H, I)
    out = _call_backend(backend, x, ids, w, gu, d)
    ref = moe_reference(x.float(), ids, w, gu.float(), d.float())
    assert out.shape == (T, H) and out.dtype == dtype
    assert not out.isnan().any(), "unwritten (poisoned) rows reached the output"
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "grouped"])
def test_gpu_cuda_graph_replay_matches_eager(backend):
    T, K, H, I, S = 16, 8, 2048, 768, 64
    fn = _graph_fn(backend)
    x, ids, w, pool = make_case(T, K, H, I, S, torch.bfloat16, "cuda", seed=1)
    gu, d = pool_views(pool, H, I)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles kernels) outside the capture
        for _ in range(2):
            fn(x, ids, w, gu, d)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, ids, w, gu, d)
    for seed in (2, 3, 4):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x2 = torch.randn(T, H, generator=gen, device="cuda").bfloat16()
        ids2, w2 = make_routing(T, K, S, "cuda", gen, drop=0.2)
        x.copy_(x2)
        ids.copy_(ids2)
        w.copy_(w2)
        graph.replay()
        eager = fn(x2, ids2, w2, gu, d)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        ref = moe_reference(x2.float(), ids2, w2, gu.float(), d.float())
        assert rel_err(out, ref) < 1e-2


def _graph_fn(backend):
    if backend == "triton":
        from moeflow.experts.kernels.triton_moe import moe_triton

        return moe_triton
    return moe_grouped


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "grouped"])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_gpu_slot_permutation_is_bitwise_invisible(backend, T):
    """Exact mode across cache states: moving experts to other slots must not change one bit."""
    K, H, I, S = 8, 256, 128, 64
    x, ids, w, pool = make_case(T, K, H, I, S, torch.bfloat16, "cuda", seed=T)
    perm = torch.randperm(S, device="cuda", generator=torch.Generator(device="cuda").manual_seed(T))
    moved = torch.empty_like(pool)
    moved[perm] = pool
    moved_ids = torch.where(ids >= 0, perm[ids.clamp(min=0)], -1)
    fn = _graph_fn(backend)
    out = fn(x, ids, w, *pool_views(pool, H, I))
    assert torch.equal(out, fn(x, moved_ids, w, *pool_views(moved, H, I)))
    assert torch.equal(out, fn(x, ids, w, *pool_views(pool, H, I)))  # and run to run


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "grouped"])
def test_gpu_pool_beyond_int32_offsets(backend):
    """Slots whose first element lies past 2**31: offsets must be computed in int64 (4.8 GB bf16 pool)."""
    H, I, S, T, K = 2048, 768, 512, 4, 2
    if torch.cuda.mem_get_info()[0] < 8 * 2**30:
        pytest.skip("needs 8 GiB free GPU memory")
    pool = torch.zeros(S, 3 * I * H, dtype=torch.bfloat16, device="cuda")
    assert (S - 1) * pool.stride(0) > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    top = torch.arange(S - 4, S, device="cuda")  # only the last slots hold experts
    pool[top] = make_pool(4, H, I, torch.bfloat16, "cuda", gen)
    x = torch.randn(T, H, generator=gen, device="cuda").bfloat16()
    ids = top[torch.randint(0, 4, (T, K), generator=gen, device="cuda")]
    w = torch.rand(T, K, generator=gen, device="cuda")
    out = _graph_fn(backend)(x, ids, w, *pool_views(pool, H, I))
    small_gu, small_d = pool_views(pool[top].float(), H, I)
    ref = moe_reference(x.float(), ids - (S - 4), w, small_gu, small_d)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "grouped"])
def test_gpu_rows_over_rounds_equal_one_fused_call(backend):
    x, ids, w, pool = make_case(40, 8, 2048, 768, 64, torch.bfloat16, "cuda", seed=8)
    gu, d = pool_views(pool, 2048, 768)
    out, rows = _rows_in_two_rounds(backend, x, ids, w, gu, d)
    assert not (rows == 7.0).any()
    assert torch.equal(out, fused_moe(x, ids, w, gu, d, backend=backend))
    assert rel_err(out, moe_reference(x.float(), ids, w, gu.float(), d.float())) < 1e-2
