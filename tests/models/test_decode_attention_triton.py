"""The Triton decode-attention kernels against the reference: under Triton's interpreter on the CPU, and on a GPU.

B sequences, N query heads, G KV heads, D head dim, R cache rows, M max_model_len, S key splits.

    TRITON_INTERPRET=1 python -m pytest tests/models/test_decode_attention_triton.py -k interpret   # on the CPU
    python -m pytest tests/models/test_decode_attention_triton.py -m gpu                            # on a CUDA machine

The interpreter runs float32/float16 only (it multiplies bfloat16 as raw integers) and needs numpy < 2.4 with
triton 3.6 (triton-lang/triton#9171: the kernel's loop bounds are read from device memory); otherwise those
tests skip and say why.
"""

import pytest
import torch

from attention_cases import make_case, poison_unread, row_rel_err
from triton_tools import interpret
from moeflow.models.decode_attention import decode_attention, decode_attention_reference, resolve_backend

CUDA = torch.cuda.is_available()


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
