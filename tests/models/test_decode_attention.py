"""Decode attention from the KV cache: the reference against a plain per-sequence loop, the Triton kernels
against the reference.

B sequences, N query heads, G KV heads, D head dim, R cache rows, M max_model_len, S key splits.

    python -m pytest tests/models/test_decode_attention.py                                   # CPU (always)
    python -m pytest tests/models/test_decode_attention.py -k compile                        # kernels build for sm_90
    TRITON_INTERPRET=1 python -m pytest tests/models/test_decode_attention.py -k interpret   # Triton kernels on CPU
    python -m pytest tests/models/test_decode_attention.py -m gpu                            # on a CUDA machine

The interpreter runs float32/float16 only (it multiplies bfloat16 as raw integers) and needs numpy < 2.4 with
triton 3.6 (triton-lang/triton#9171: the kernel's loop bounds are read from device memory); otherwise those
tests skip and say why.
"""

import pytest
import torch
import torch.nn.functional as F

from triton_tools import INTERPRET, compile_sm90, interpret, spilled_bytes
from moeflow.models.decode_attention import (
    decode_attention, decode_attention_reference, num_splits, resolve_backend,
)

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- helpers


def make_case(B, N, G, D, M, *, dtype=torch.float32, device="cpu", seed=0, lens=None, spare_rows=5):
    """Random q and cache (never zeros), B distinct rows drawn from R = B + spare_rows, none of them row 0 (so
    never 0..B-1), and lengths in 1..M unless given."""
    gen = torch.Generator(device=device).manual_seed(seed)
    R = B + spare_rows
    k_cache = torch.randn(R, G, M, D, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(R, G, M, D, generator=gen, device=device).to(dtype)
    q = torch.randn(B, N, D, generator=gen, device=device).to(dtype)
    rows = torch.randperm(R - 1, generator=gen, device=device)[:B] + 1
    if lens is None:
        lens = torch.randint(1, M + 1, (B,), generator=gen, device=device)
    else:
        lens = torch.as_tensor(lens, dtype=torch.int64).to(device)
    return q, k_cache, v_cache, rows, lens


def loop_attention(q, k_cache, v_cache, rows, lens, scale, window):
    """The formula written plainly: per sequence, torch SDPA in float64 on exactly the keys it may see
    (its own row, positions max(0, len - window) .. len - 1), KV heads repeated for their query heads."""
    B, N, D = q.shape
    G = k_cache.shape[1]
    out = torch.zeros(B, N * D, dtype=torch.float64)
    for b in range(B):
        length, row = int(lens[b]), int(rows[b])
        lo = 0 if window is None else max(0, length - window)
        if length == 0:
            continue
        k = k_cache[row, :, lo:length].cpu().double().repeat_interleave(N // G, dim=0)  # [N, keys, D]
        v = v_cache[row, :, lo:length].cpu().double().repeat_interleave(N // G, dim=0)
        o = F.scaled_dot_product_attention(q[b].cpu().double()[:, None, :], k, v, scale=scale)  # [N, 1, D]
        out[b] = o.reshape(-1)
    return out


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst relative error over sequences: a long context's output is small (an average of many values),
    so one norm over the batch would let short sequences hide errors in the long ones."""
    out, ref = out.double().cpu(), ref.double().cpu()
    diff = (out - ref).norm(dim=1)
    scale = ref.norm(dim=1)
    return float(torch.where(scale > 0, diff / scale.clamp(min=1e-300), diff).max())


def poison_unread(k_cache, v_cache, rows, lens, window):
    """NaN everywhere the call must not read: rows not in the batch, and in each batch row the positions
    past its length and before its window."""
    M = k_cache.shape[2]
    keep_rows = torch.zeros(k_cache.shape[0], dtype=torch.bool, device=k_cache.device)
    keep_rows[rows] = True
    for cache in (k_cache, v_cache):
        cache[~keep_rows] = float("nan")
    pos = torch.arange(M, device=k_cache.device)
    for b in range(rows.numel()):
        length = int(lens[b])
        bad = pos >= length
        if window is not None:
            bad |= pos < length - window
        for cache in (k_cache, v_cache):
            cache[int(rows[b]), :, bad] = float("nan")


# ---------------------------------------------------------------------------------------------- reference


def _reference_grid():
    """B x (N, G) x D x window, with M and the single sequence's length of B=1 rotating through the cases."""
    cases, n = [], 0
    for B in (1, 3, 8):
        for N, G in ((4, 4), (4, 2), (8, 1), (16, 4), (32, 4)):
            for D in (16, 40, 64, 128):
                for window in (None, 5):
                    M = (64, 100, 300)[n % 3]
                    cases.append(pytest.param(B, N, G, D, M, window, n, id=f"B{B}-N{N}-G{G}-D{D}-M{M}-w{window}"))
                    n += 1
    return cases


def _grid_lengths(B, M, n, gen):
    """1 and M in every batch of 3 or more; a single sequence cycles through M, 1 and a random length."""
    lens = torch.randint(1, M + 1, (B,), generator=gen)
    if B == 1:
        lens[0] = (M, 1, int(lens[0]))[n % 3]
    else:
        lens[0], lens[1] = M, 1
    return lens


@pytest.mark.parametrize("B,N,G,D,M,window,n", _reference_grid())
def test_reference_matches_loop(B, N, G, D, M, window, n):
    lens = _grid_lengths(B, M, n, torch.Generator().manual_seed(n))
    q, k, v, rows, lens = make_case(B, N, G, D, M, seed=n, lens=lens)
    scale = D**-0.5
    out = decode_attention_reference(q, k, v, rows, lens, scale, window)
    assert out.shape == (B, N * D) and out.dtype == torch.float32
    assert row_rel_err(out, loop_attention(q, k, v, rows, lens, scale, window)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_reference_dtypes(dtype, tol):
    """float64 inputs are computed in float64 (the GPU tests' reference); half inputs in float32, cast back."""
    q, k, v, rows, lens = make_case(5, 8, 2, 40, 90, dtype=dtype, seed=3)
    out = decode_attention_reference(q, k, v, rows, lens, 0.2, None)
    assert out.dtype == dtype
    assert row_rel_err(out, loop_attention(q, k, v, rows, lens, 0.2, None)) < tol


@pytest.mark.parametrize("window", [1, 2, 5, 63, 64, 65, 1000])
def test_reference_sliding_window_and_length_one(window):
    B, N, G, D, M = 6, 8, 2, 40, 64
    lens = [1, 2, 5, 64, 33, 1]
    q, k, v, rows, lens = make_case(B, N, G, D, M, seed=window, lens=lens)
    q = 3 * q  # sharper softmax: a wrong key would show
    out = decode_attention_reference(q, k, v, rows, lens, D**-0.5, window)
    assert row_rel_err(out, loop_attention(q, k, v, rows, lens, D**-0.5, window)) < 1e-5
    heads = torch.arange(N) // (N // G)
    for b in range(B):
        length = int(lens[b])
        if length == 1 or window == 1:  # a single key: the output is exactly its value, head by head
            expect = v[int(rows[b]), heads, length - 1]  # [N, D]
            assert torch.equal(out[b].view(N, D), expect)
    no_window = decode_attention_reference(q, k, v, rows, lens, D**-0.5, None)
    if window >= M:  # a window at least as long as every context changes nothing
        assert torch.allclose(out, no_window, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(out[3], no_window[3])  # length 64 > window: keys dropped


def test_reference_never_sees_unread_keys():
    """NaN in other rows, past each length and before each window leaves the output finite and unchanged."""
    B, N, G, D, M, window = 4, 8, 2, 40, 80, 9
    q, k, v, rows, lens = make_case(B, N, G, D, M, seed=4, lens=[80, 1, 30, 5])
    clean = decode_attention_reference(q, k, v, rows, lens, D**-0.5, window)
    poison_unread(k, v, rows, lens, window)
    out = decode_attention_reference(q, k, v, rows, lens, D**-0.5, window)
    assert not out.isnan().any() and torch.equal(out, clean)


def test_reference_edge_lengths():
    """Length 0 gives zeros; lengths past M count as M; int32 rows and lengths work as int64."""
    B, N, G, D, M = 3, 4, 2, 16, 32
    q, k, v, rows, _ = make_case(B, N, G, D, M, seed=5)
    out = decode_attention_reference(q, k, v, rows, torch.tensor([0, M, 7]), 0.25, None)
    assert torch.equal(out[0], torch.zeros(N * D))
    assert torch.equal(decode_attention_reference(q, k, v, rows, torch.tensor([0, M + 9, 7]), 0.25, None), out)
    assert torch.equal(decode_attention_reference(q, k, v, rows.int(), torch.tensor([0, M, 7]).int(), 0.25, None),
                       out)


def test_reference_reads_only_its_own_cache_row():
    """The same sequence in another cache row, among other sequences, gives the same output."""
    q, k, v, rows, lens = make_case(4, 8, 4, 40, 50, seed=6)
    out = decode_attention_reference(q, k, v, rows, lens, 0.3, 7)
    perm = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(1))
    moved_k, moved_v = torch.empty_like(k), torch.empty_like(v)
    moved_k[perm], moved_v[perm] = k, v
    order = torch.tensor([2, 0, 3, 1])
    moved = decode_attention_reference(q[order], moved_k, moved_v, perm[rows][order], lens[order], 0.3, 7)
    assert torch.allclose(moved, out[order], rtol=0, atol=1e-6)


def test_input_checks():
    q, k, v, rows, lens = make_case(2, 8, 2, 16, 20)
    for bad, match in [
        (dict(q=q[0]), "q must be"), (dict(k_cache=k[..., :8], v_cache=v[..., :8]), "head dim"),
        (dict(v_cache=v[:, :1]), "both be"),
        (dict(q=q[:, :7]), "cannot share"), (dict(rows=rows[:1]), "rows must be"),
        (dict(context_lens=lens.float()), "int32 or int64"), (dict(q=q.double()), "share a dtype"),
        (dict(window=0), "window"),
    ]:
        args = dict(q=q, k_cache=k, v_cache=v, rows=rows, context_lens=lens, scale=0.25, window=None) | bad
        with pytest.raises(ValueError, match=match):
            decode_attention_reference(**args)


def test_num_splits_from_shapes_only():
    for B in (1, 2, 8, 32, 64, 256):
        for G in (1, 4, 8):
            for M in (16, 64, 300, 4096, 40960):
                S, cap = num_splits(B, G, M), -(-M // 64)
                assert 1 <= S <= min(64, cap)
                assert S & (S - 1) == 0 or S == cap  # a power of two unless max_len caps it
                assert num_splits(2 * B, G, M) <= S  # more sequences, fewer splits each
    assert num_splits(1, 4, 4096) == 64 and num_splits(256, 4, 4096) == 1


def test_dispatch_on_cpu():
    q, k, v, rows, lens = make_case(3, 8, 2, 16, 40, seed=2)
    assert resolve_backend(q, "auto") == "reference"
    assert resolve_backend(q, "reference") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(q, "flash")
    if not INTERPRET:
        with pytest.raises(ValueError, match="triton"):
            resolve_backend(q, "triton")
    ref = decode_attention_reference(q, k, v, rows, lens, 0.25, 4)
    assert torch.equal(decode_attention(q, k, v, rows, lens, 0.25, 4), ref)
    assert torch.equal(decode_attention(q, k, v, rows, lens, 0.25, 4, backend="reference"), ref)


# ---------------------------------------------------------------------------------------------- compile





@pytest.mark.slow
@pytest.mark.parametrize("dtype_name,N,G,D,window,S", [
    ("bf16", 16, 4, 128, None, 32), ("bf16", 32, 4, 128, None, 8), ("fp16", 32, 4, 128, 4000, 1),
    ("fp32", 4, 4, 40, None, 8), ("fp32", 16, 4, 128, 7, 8), ("bf16", 8, 8, 40, 100, 4), ("bf16", 64, 4, 256, 100, 4),
    ("bf16", 128, 4, 128, None, 2), ("bf16", 16, 4, 256, None, 64),
])
def test_triton_kernels_compile_for_sm90(dtype_name, N, G, D, window, S, tmp_path):
    """Catches compile errors, shared-memory overuse and register spills in the GPU kernels on a CPU-only
    machine."""
    pytest.importorskip("triton")
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    import triton

    import moeflow.models.decode_attention_triton as da

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    M, QG = 4096, N // G
    block_n, warps = da.launch_config(D, dtype)
    d_pad = max(16, triton.next_power_of_2(D))
    ty = f"*{dtype_name}"
    o_ty = ty if S == 1 else "*fp32"
    strides_k = dict(stride_kr=G * M * D, stride_kg=M * D, stride_km=D, stride_kd=1)
    split = compile_sm90(
        da._split_kernel,
        dict(q_ptr=ty, k_ptr=ty, v_ptr=ty, rows_ptr="*i64", lens_ptr="*i64", o_ptr=o_ty, lse_ptr="*fp32",
             M=M, window=window or 0, qk_scale="fp32", S=S, stride_qb=N * D, stride_qh=D, stride_qd=1,
             **strides_k, **{k.replace("_k", "_v"): v for k, v in strides_k.items()},
             stride_ob=N * S * D, stride_oh=S * D, stride_os=D, stride_od=1, stride_lb=N * S, stride_lh=S),
        dict(QG=QG, D=D, QG_PAD=max(16, triton.next_power_of_2(QG)), D_PAD=d_pad, BLOCK_N=block_n,
             HAS_WINDOW=window is not None, DIRECT=S == 1, IEEE=dtype == torch.float32),
        warps, 2,
    )
    assert split.metadata.shared <= 227 * 1024
    assert spilled_bytes(split, tmp_path) == 0
    if S > 1:
        combine = compile_sm90(
            da._combine_kernel,
            dict(o_ptr="*fp32", lse_ptr="*fp32", out_ptr=ty, S=S, stride_ob=N * S * D, stride_oh=S * D,
                 stride_os=D, stride_od=1, stride_lb=N * S, stride_lh=S, stride_outb=N * D, stride_outh=D),
            dict(D=D, S_PAD=max(2, triton.next_power_of_2(S)), D_PAD=d_pad), 4, 2,
        )
        assert spilled_bytes(combine, tmp_path) == 0


# ---------------------------------------------------------------------------------------------- interpreter




@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,G,D,M,window,S", [
    (3, 4, 4, 16, 200, None, None),  # one query head per KV head (padded to 16 rows), default splits
    (3, 8, 2, 40, 100, 5, 3),  # head dim 40 (read as 64), a window, S not a power of two
    (2, 8, 1, 64, 70, None, 1),  # S = 1: the split kernel writes the output, no combine
    (4, 32, 4, 40, 130, 33, 8),  # 8 heads per group; more splits than some sequences have blocks
])
def test_interpret_triton_matches_reference(B, N, G, D, M, window, S, dtype):
    from moeflow.models.decode_attention_triton import decode_attention_triton

    lens = torch.randint(1, M + 1, (B,), generator=torch.Generator().manual_seed(M))
    lens[0], lens[1] = M, 1
    q, k, v, rows, lens = make_case(B, N, G, D, M, dtype=dtype, seed=B * M, lens=lens)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), rows, lens, D**-0.5, window)
    poison_unread(k, v, rows, lens, window)
    out = decode_attention_triton(q, k, v, rows, lens, D**-0.5, window, splits=S, poison=True)
    assert out.shape == (B, N * D) and out.dtype == dtype and not out.isnan().any()
    assert row_rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@interpret
@pytest.mark.parametrize("S", [1, 4])
def test_interpret_zero_and_overlong_lengths(S):
    """Length 0 gives zeros (no NaN from empty splits), a length past M counts as M, int32 indices work."""
    from moeflow.models.decode_attention_triton import decode_attention_triton

    B, N, G, D, M = 3, 4, 2, 16, 48
    q, k, v, rows, _ = make_case(B, N, G, D, M, seed=S)
    lens = torch.tensor([0, M + 5, 9])
    out = decode_attention_triton(q, k, v, rows.int(), lens.int(), 0.25, None, splits=S, poison=True)
    assert torch.equal(out[0], torch.zeros(N * D))
    ref = decode_attention_reference(q, k, v, rows, lens, 0.25, None)
    assert row_rel_err(out, ref) < 1e-5


@interpret
def test_interpret_dispatch():
    q, k, v, rows, lens = make_case(2, 4, 2, 16, 40, seed=9)
    assert resolve_backend(q, "triton") == "triton"
    ref = decode_attention_reference(q, k, v, rows, lens, 0.25, 6)
    assert row_rel_err(decode_attention(q, k, v, rows, lens, 0.25, 6, backend="triton"), ref) < 1e-5
    q_nc = torch.stack([q, torch.full_like(q, float("nan"))], dim=2).flatten(1, 2)[:, ::2]  # strided heads
    assert not q_nc.is_contiguous()
    assert row_rel_err(decode_attention(q_nc, k, v, rows, lens, 0.25, 6, backend="triton"), ref) < 1e-5


# ---------------------------------------------------------------------------------------------- GPU

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


def _gpu_lengths(B, M, gen):
    """Long and short sequences mixed in one batch: M, 1, M - 1, 2, then random lengths from every scale."""
    fixed = [M, 1, M - 1, 2, 63, 64, 65]
    lens = [fixed[i] if i < len(fixed) else int(torch.randint(1, M + 1, (1,), generator=gen)) for i in range(B)]
    if B > len(fixed):  # a share of short ones among the random
        lens[len(fixed) :: 3] = [int(x) for x in torch.randint(1, 200, (len(lens[len(fixed) :: 3]),), generator=gen)]
    return lens


def _gpu_grid():
    """Every dtype x batch x GQA ratio, with D, M, the window and S rotating through them."""
    cases, n = [], 0
    shapes = [(40, 4096), (64, 4096), (128, 4096), (128, 777), (40, 300), (128, 2048)]
    windows = [None, 5, None, 1000, None, 4095]
    for name in _DTYPES:
        for B in (1, 5, 32, 64):
            for ratio in (1, 2, 4, 8):
                D, M = shapes[n % len(shapes)]
                window = windows[(n // 2) % len(windows)]
                G = 4 if ratio < 8 else 2
                cases.append(pytest.param(name, B, G * ratio, G, D, M, window, None,
                                          id=f"{name}-B{B}-N{G * ratio}-G{G}-D{D}-M{M}-w{window}"))
                n += 1
    for name in _DTYPES:  # split counts the default never picks for these shapes: 1 (direct), odd, many
        for S in (1, 3, 64):
            cases.append(pytest.param(name, 5, 16, 4, 128, 4096, None, S, id=f"{name}-B5-N16-G4-D128-M4096-S{S}"))
            cases.append(pytest.param(name, 5, 8, 8, 40, 4096, 100, S, id=f"{name}-B5-N8-G8-D40-M4096-w100-S{S}"))
    cases.append(pytest.param("bf16", 256, 32, 4, 128, 4096, None, None, id="bf16-B256-N32-G4-D128-M4096-direct"))
    cases.append(pytest.param("bf16", 3, 64, 4, 256, 1024, None, None, id="bf16-B3-N64-G4-D256-M1024"))
    return cases


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name,B,N,G,D,M,window,S", _gpu_grid())
def test_gpu_triton_matches_reference(name, B, N, G, D, M, window, S):
    from moeflow.models.decode_attention_triton import decode_attention_triton

    dtype = _DTYPES[name]
    seed = B * 100 + N + D + M
    lens = _gpu_lengths(B, M, torch.Generator().manual_seed(seed))
    q, k, v, rows, lens = make_case(B, N, G, D, M, dtype=dtype, device="cuda", seed=seed, lens=lens)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), rows, lens, D**-0.5, window)
    poison_unread(k, v, rows, lens, window)
    out = decode_attention_triton(q, k, v, rows, lens, D**-0.5, window, splits=S, poison=True)
    torch.cuda.synchronize()
    assert out.shape == (B, N * D) and out.dtype == dtype
    assert not out.isnan().any(), "unwritten (poisoned) elements or unread cache positions reached the output"
    assert row_rel_err(out, ref) < _TOL[name]
    if S is None:  # auto picks triton on CUDA, and run to run the result is bitwise stable
        assert torch.equal(decode_attention(q, k, v, rows, lens, D**-0.5, window), out)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name,B,N,G,D,window", [
    ("bf16", 8, 16, 4, 128, None), ("bf16", 1, 32, 4, 128, None), ("fp32", 8, 16, 4, 40, 7),
    ("fp16", 64, 32, 4, 128, 1000), ("bf16", 256, 32, 4, 128, None),  # the last one has S = 1
])
def test_gpu_cuda_graph_replay_with_new_lengths_and_rows(name, B, N, G, D, window):
    """Capture once with static inputs; each replay with new rows, lengths (M and 1 among them), queries and
    cache contents must match the reference and an eager call bit for bit."""
    dtype, M = _DTYPES[name], 4096
    scale = D**-0.5
    q, k, v, rows, lens = make_case(B, N, G, D, M, dtype=dtype, device="cuda", seed=1, lens=[1] * B)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        for _ in range(2):
            decode_attention(q, k, v, rows, lens, scale, window)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, rows, lens, scale, window)
    R = k.shape[0]
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        new_lens = torch.randint(1, M + 1, (B,), generator=gen)
        new_lens[0] = (M, 1, 2, M - 1, 4000)[seed]
        if B > 1:
            new_lens[-1] = (1, M, 4095, 1, 64)[seed]
        new_rows = torch.randperm(R, generator=gen)[:B]
        lens.copy_(new_lens)
        rows.copy_(new_rows)
        qgen = torch.Generator(device="cuda").manual_seed(100 + seed)
        q.copy_(torch.randn(q.shape, generator=qgen, device="cuda").to(dtype))
        k.copy_(torch.randn(k.shape, generator=qgen, device="cuda").to(dtype))
        v.copy_(torch.randn(v.shape, generator=qgen, device="cuda").to(dtype))
        graph.replay()
        eager = decode_attention(q, k, v, rows, lens, scale, window)
        ref = decode_attention_reference(q.double(), k.double(), v.double(), rows, lens, scale, window)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        assert torch.equal(out, eager), f"replay {seed} differs from the eager call"
        assert row_rel_err(out, ref) < _TOL[name], f"replay {seed}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B", [1, 64, 256])  # many splits, a few, and S = 1
def test_gpu_eager_call_never_syncs_the_host(B):
    q, k, v, rows, lens = make_case(B, 32, 4, 128, 4096, dtype=torch.bfloat16, device="cuda", seed=B)
    decode_attention(q, k, v, rows, lens, 0.1, 100)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_attention(q, k, v, rows, lens, 0.1, 100)
    finally:
        torch.cuda.set_sync_debug_mode(0)
