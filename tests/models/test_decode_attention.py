"""Decode attention from the KV cache on the CPU: the reference against a plain per-sequence loop, its checks and
dispatch, and the Triton kernels built for sm_90 (test_decode_attention_triton.py runs them).

B sequences, N query heads, G KV heads, D head dim, R cache rows, M max_model_len, S key splits.

    python -m pytest tests/models/test_decode_attention.py                                   # CPU (always)
    python -m pytest tests/models/test_decode_attention.py -k compile                        # kernels build for sm_90
"""

import pytest
import torch

from attention_cases import loop_attention, make_case, poison_unread, row_rel_err
from triton_tools import INTERPRET, compile_sm90, spilled_bytes
from moeflow.models.decode_attention import (
    decode_attention, decode_attention_reference, num_splits, resolve_backend,
)


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
