"""The Triton expert kernels against the plain-torch reference: under Triton's interpreter on the CPU, and on a GPU.

T tokens, K top-k, H hidden, I expert width, S slots.

    TRITON_INTERPRET=1 python -m pytest tests/experts/test_kernels_triton.py -k interpret   # on the CPU
    python -m pytest tests/experts/test_kernels_triton.py -m gpu                            # on a CUDA machine

The interpreter runs float32/float16 only (it multiplies bfloat16 as raw integers) and needs numpy < 2.4 with
triton 3.6 (triton-lang/triton#9171); otherwise those tests skip and say why.
"""

import pytest
import torch

from kernel_cases import DTYPES, make_case, make_pool, make_routing, pool_views, rel_err, rows_in_two_rounds
from triton_tools import interpret
from moeflow.experts.kernels import fused_moe, resolve_backend
from moeflow.experts.kernels.grouped import moe_grouped
from moeflow.experts.kernels.reference import moe_reference

CUDA = torch.cuda.is_available()


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
def test_interpret_taller_tiles_with_the_decode_blocks():
    """32-row tiles with the decode config's N and K blocks (with_block_m, as tools/moe_tile_time.py times them)
    compute what the reference does, with several tiles per slot."""
    from moeflow.experts.kernels.triton_moe import moe_triton, pick_config, with_block_m

    T, K, H, I, S = 37, 2, 72, 40, 6
    x, _, w, pool = make_case(T, K, H, I, S, seed=3)
    gu, d = pool_views(pool, H, I)
    ids = torch.tensor([0, 2, 5])[torch.randint(0, 3, (T, K), generator=torch.Generator().manual_seed(3))]
    ids[::5, 1] = -1
    cfg = with_block_m(pick_config(8, 64, H, I, x.dtype), 32, x.dtype)
    assert cfg.block_m == 32
    out = moe_triton(x, ids.to(torch.int32), w, gu, d, config=cfg, poison=True)
    assert rel_err(out, moe_reference(x, ids, w, gu, d)) < 1e-5


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
    out, rows = rows_in_two_rounds("triton", x, ids, w, gu, d)
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

_HIS = [(h, i, s) for h in (256, 2048) for i in (128, 768) for s in (8, 64, 130)]


def _gpu_grid():
    """Every (dtype, T, K) with the (H, I, S) combinations rotating through them: 60 cases cover each
    value of every axis many times (and all three tile configs) without the 360-case product."""
    cases = []
    n = 0
    for name in DTYPES:
        for T in (1, 3, 16, 64, 257):
            for K in (1, 2, 4, 8):
                H, I, S = _HIS[(n * 5) % len(_HIS)]
                n += 1
                cases.append(pytest.param(name, T, K, H, I, S, id=f"{name}-T{T}-K{K}-H{H}-I{I}-S{S}"))
    for name in DTYPES:  # make sure every dtype meets the mid (BM=32) and prefill (BM=64) tile configs
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
    dtype = DTYPES[dtype_name]
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
    out, rows = rows_in_two_rounds(backend, x, ids, w, gu, d)
    assert not (rows == 7.0).any()
    assert torch.equal(out, fused_moe(x, ids, w, gu, d, backend=backend))
    assert rel_err(out, moe_reference(x.float(), ids, w, gu.float(), d.float())) < 1e-2
