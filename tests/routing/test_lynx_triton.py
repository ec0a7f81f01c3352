"""The one-launch LYNX kernel (routing/_lynx_triton.py) against the torch selector it replaces: the same ids,
the same weights to float32 rounding, on the grid the selector is tested on, with padding, exact rows and
residency. Run under Triton's interpreter on a CPU (TRITON_INTERPRET=1), compiled for sm_90 without a GPU, and
on a GPU inside a CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.architectures.spec import RouterSpec
from moeflow.errors import ConfigError
from moeflow.routing import _lynx_triton
from moeflow.routing.lynx import AffinityBinning
from moeflow.routing.router import route
from moeflow.routing.selection import SelectionContext
from test_lynx import GRID, router_logits
from triton_tools import INTERPRET, compile_sm90, interpret, spilled_bytes

needs_triton = pytest.mark.skipif(not _lynx_triton.available(), reason="needs Triton")


def case(T, E, K, alpha, beta, normalize, dtype, seed, w=0, device="cpu"):
    spec = RouterSpec(K, normalize, dtype != torch.float32)
    torch_sel = AffinityBinning(alpha, beta, spec, w, kernel="torch")  # the reference, on any device
    logits = router_logits(T, E, seed=1000 * T + E + seed, dtype=dtype).to(device)
    r = route(logits, spec)
    g = np.random.default_rng(seed)
    n_real = T if seed % 2 == 0 else max(1, T - int(g.integers(0, max(1, T // 3) + 1)))  # padding at the end
    real = torch.tensor([b < n_real for b in range(T)], device=device)
    exact = torch.tensor((g.random(T) < 0.3).tolist() if seed else [False] * T, device=device)
    if not bool((real & ~exact).any()):
        exact[0] = False
    slots = (torch.tensor(np.where(g.random(E) < 0.4, np.arange(E), -1), dtype=torch.int32, device=device)
             if w else None)  # int32, as the expert cache keeps its device table
    return torch_sel, r, SelectionContext(False, real, exact, slots)


def kernel_select(sel: AffinityBinning, r, c: SelectionContext, rows_per_program=None, out=None, kept=None):
    T, E = r.logits.shape
    top, scale = sel._key_scale(T, E)
    return _lynx_triton.affinity_binning(r.logits, r.ids, r.weights, c.real, c.exact, c.slot_table, sel.alpha,
                                         sel.beta, scale, sel.resident_weight * top, sel.router.normalize,
                                         rows_per_program=rows_per_program, out=out, kept=kept)


def sources(real: torch.Tensor) -> torch.Tensor:
    """The row each row copies: itself when real, else the last real row before it (RouteRecord.set_rows)."""
    rows = torch.arange(len(real), device=real.device)
    return torch.where(real, rows, -1).cummax(dim=0).values.clamp(min=0)


def check_same(sel, r, c, rows_per_program=None, out=None, kept=None):
    """The kernel's choice is the torch selector's, each padding row's being the choice of the row it copies (which
    the torch selector's caller, RouteRecord.write_selected, copies there; the kernel computes it so)."""
    want = sel.select(0, r, c)
    src = sources(c.real)
    ids, weights = kernel_select(sel, r, c, rows_per_program, out, kept)
    np.testing.assert_array_equal(ids.cpu().numpy(), want.ids[src].cpu().numpy())
    assert weights.dtype == want.weights.dtype
    tol = 1e-2 if weights.dtype == torch.bfloat16 else 2e-6
    np.testing.assert_allclose(weights.float().cpu().numpy(), want.weights[src].float().cpu().numpy(), rtol=tol,
                               atol=tol)
    return ids, weights


@interpret
@pytest.mark.parametrize("T,E,K,alpha,beta", GRID)
@pytest.mark.parametrize("normalize,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_the_kernel_chooses_what_the_torch_selector_chooses(T, E, K, alpha, beta, normalize, dtype):
    for seed in range(3):
        check_same(*case(T, E, K, alpha, beta, normalize, dtype, seed))


@interpret
@pytest.mark.parametrize("rows_per_program", [1, 4, 16])
@pytest.mark.parametrize("T,E,K,alpha,beta", [g for g in GRID if g[0] > 1])
def test_the_kernel_spread_over_programs_chooses_the_same(T, E, K, alpha, beta, rows_per_program):
    """Rows split over programs: the popularity each sums alone and the kept set OR-ed across them give the
    same ids as one program, with padding, exact rows and residency, whatever the rows per program."""
    for seed in range(3):
        check_same(*case(T, E, K, alpha, beta, seed != 1, torch.float32, seed, w=4 * (seed == 2)),
                   rows_per_program)


@interpret
@pytest.mark.parametrize("rows_per_program", [None, 4])
def test_the_kernel_writes_into_the_buffers_it_is_given(rows_per_program):
    """SelectionContext.out: the choice lands in the record's own buffers (padding rows their source row's), and
    RouteRecord.write_selected then takes them as they are."""
    from moeflow.routing.record import RouteRecord

    sel, r, c = case(24, 64, 8, 3.0, 1, True, torch.float32, 1)
    assert not bool(c.real.all())  # padding rows at the end
    record = RouteRecord(2, 8, 64, 32, torch.float32, torch.device("cpu"))
    out = record.selected_out(1, 24)
    ids, weights = check_same(sel, r, c, rows_per_program, out)
    assert ids.data_ptr() == out[0].data_ptr() and weights.data_ptr() == out[1].data_ptr()
    got = record.write_selected(1, ids, weights)
    assert got[0].data_ptr() == out[0].data_ptr() and torch.equal(got[0], ids)
    with pytest.raises(ValueError, match="out must be"):
        kernel_select(sel, r, c, rows_per_program, (out[0][:, :4], out[1]))


@interpret
def test_the_spread_kernel_takes_the_records_zeroed_scratch_for_its_kept_set():
    """SelectionContext.scratch: the spread launches OR the kept set into the record's per-layer [E] buffer, which
    RouteRecord.set_rows zeroes before every step that runs a selector (one fill a step, not one a layer); the
    choice is the one a fresh buffer gives."""
    from moeflow.routing.record import RouteRecord

    sel, r, c = case(40, 64, 8, 3.0, 1, True, torch.float32, 2)
    record = RouteRecord(2, 8, 64, 64, torch.float32, torch.device("cpu"))
    for step in range(2):  # the second step reuses the buffer the first left holding its kept set
        record.set_rows(40, 40, [False] * 40)
        assert not record.scratch.any(), "zeroed before a step that runs a selector"
        ids, _ = check_same(sel, r, c, 4, kept=record.scratch[1])
        kept = record.scratch[1] > 0
        assert 0 < int(kept.sum()) < 64 and bool(kept[ids.flatten()].all()), "it holds the kept set"
    record.set_rows(40, 40, None)
    assert record.scratch[1].any(), "a step without a selector leaves it alone"
    with pytest.raises(ValueError, match="kept must be"):
        kernel_select(sel, r, c, 4, kept=torch.zeros(64, dtype=torch.int64))


@interpret
@pytest.mark.parametrize("w", [1, 4, 64])
def test_the_kernel_is_cache_aware_as_the_torch_selector_is(w):
    for seed in range(3):
        check_same(*case(32, 64, 8, 3.0, 2, True, torch.float32, seed, w=w))


@interpret
def test_ties_break_the_same_way():
    spec = RouterSpec(4, True, True)
    sel = AffinityBinning(3.0, 2, spec, kernel="torch")
    logits = (torch.randint(-4, 4, (32, 32)).float() / 4).to(torch.bfloat16)  # few distinct values: many ties
    T = 32
    check_same(sel, route(logits, spec), SelectionContext(False, torch.ones(T, dtype=torch.bool),
                                                          torch.zeros(T, dtype=torch.bool), None))


def test_the_kernel_is_refused_without_triton_or_with_an_unknown_name(monkeypatch):
    spec = RouterSpec(4, True, False)
    with pytest.raises(ConfigError, match="kernel must be"):
        AffinityBinning(3.0, 2, spec, kernel="cuda")
    monkeypatch.setattr(_lynx_triton, "triton", None)
    with pytest.raises(ConfigError, match="needs Triton"):
        AffinityBinning(3.0, 2, spec, kernel="triton")
    assert AffinityBinning(3.0, 2, spec).kernel == "auto", "without Triton the default falls back to torch's"


def test_auto_runs_the_kernel_only_on_cuda_with_triton(monkeypatch):
    """`auto` (the default) takes the Triton kernel where it can run, the torch selector elsewhere."""
    spec = RouterSpec(4, True, False)
    monkeypatch.setattr(_lynx_triton, "available", lambda: True)
    auto, torch_rule = AffinityBinning(3.0, 2, spec), AffinityBinning(3.0, 2, spec, kernel="torch")
    assert auto.runs_kernel(True) and not auto.runs_kernel(False)
    assert not torch_rule.runs_kernel(True)
    assert AffinityBinning(3.0, 2, spec, kernel="triton").runs_kernel(True)
    monkeypatch.setattr(_lynx_triton, "available", lambda: False)
    assert not auto.runs_kernel(True), "no Triton: torch's rule"


@needs_triton
@pytest.mark.parametrize("BT,BE,K,beta,dtype,slots,normalize", [
    (32, 64, 8, 2, "bf16", True, False), (64, 128, 8, 2, "bf16", True, True), (16, 32, 4, 3, "fp32", False, True),
    (128, 64, 8, 4, "fp16", False, False)])
def test_the_kernel_compiles_for_the_h200(BT, BE, K, beta, dtype, slots, normalize, tmp_path):
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    args = {"logits_ptr": f"*{dtype}", "ids_ptr": "*i64", "w_ptr": f"*{dtype}", "real_ptr": "*i1",
            "exact_ptr": "*i1", "slot_ptr": "*i32" if slots else "*i1", "out_ids_ptr": "*i64",
            "out_w_ptr": f"*{dtype}", "T": 29, "E": BE, "stride_l": BE, "alpha": "fp32", "scale": "i64",
            "bonus": "i64"}
    compiled = compile_sm90(_lynx_triton._affinity_binning, args,
                            {"K": K, "BETA": beta, "BT": BT, "BE": BE, "HAS_SLOTS": slots, "NORMALIZE": normalize},
                            num_warps=8, num_stages=1)
    assert compiled.asm["ptx"]
    print(f"BT {BT} BE {BE}: {spilled_bytes(compiled, tmp_path)} bytes spilled")


@needs_triton
@pytest.mark.parametrize("RB,BE,K,beta,slots,normalize", [(4, 64, 8, 2, True, False), (2, 128, 8, 3, False, True),
                                                          (8, 64, 4, 1, False, True)])
def test_the_spread_kernels_compile_for_the_h200(RB, BE, K, beta, slots, normalize, tmp_path):
    if INTERPRET:
        pytest.skip("kernels are interpreted, not compiled, under TRITON_INTERPRET=1")
    common = {"logits_ptr": "*bf16", "ids_ptr": "*i64", "real_ptr": "*i1", "exact_ptr": "*i1"}
    propose = compile_sm90(_lynx_triton._lynx_propose,
                           {**common, "slot_ptr": "*i32" if slots else "*i1", "kept_ptr": "*i32", "T": 29, "E": BE,
                            "stride_l": BE, "alpha": "fp32", "scale": "i64", "bonus": "i64"},
                           {"K": K, "BETA": beta, "RB": RB, "CH": 16, "BE": BE, "HAS_SLOTS": slots},
                           num_warps=2, num_stages=1)
    apply = compile_sm90(_lynx_triton._lynx_apply,
                         {**common, "w_ptr": "*bf16", "kept_ptr": "*i32", "out_ids_ptr": "*i64", "out_w_ptr": "*bf16",
                          "T": 29, "E": BE, "stride_l": BE},
                         {"K": K, "RB": RB, "BT": 256, "BE": BE, "NORMALIZE": normalize}, num_warps=2, num_stages=1)
    for compiled in (propose, apply):
        assert compiled.asm["ptx"]
        assert spilled_bytes(compiled, tmp_path) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _lynx_triton.available(), reason="needs a CUDA device")
def test_on_the_gpu_eager_and_in_a_cuda_graph():
    for T, E, K, alpha, beta in GRID:
        for seed in range(2):
            sel, r, c = case(T, E, K, alpha, beta, seed % 2 == 0, torch.bfloat16, seed, w=seed * 4, device="cuda")
            for rows in (None, 4):  # one program, and the rows spread over programs
                check_same(sel, r, c, rows)
    sel, r, c = case(32, 64, 8, 3.0, 2, True, torch.bfloat16, 1, device="cuda")
    for rows in (None, 4):
        kernel = AffinityBinning(sel.alpha, sel.beta, sel.router, kernel="triton", rows_per_program=rows)
        eager = kernel.select(0, r, c)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            kernel.select(0, r, c)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kernel.select(0, r, c)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.ids, eager.ids) and torch.equal(out.weights, eager.weights)
