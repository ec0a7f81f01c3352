"""LYNX's AffinityBinning against a plain reference of the rule (LYNX, arXiv 2411.08982), written from the rule with
loops and exact fractions, and the properties the engine relies on: K experts per token, exact rows and
prefill untouched, padding ignored, the limits where the rule gives the exact routing, cache-awareness."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from moeflow.architectures.spec import RouterSpec
from moeflow.errors import ConfigError
from moeflow.routing.lynx import AffinityBinning, lynx_defaults
from moeflow.routing.router import Routing, route
from moeflow.routing.selection import SelectionContext


# -- the reference --------------------------------------------------------------------------------------------

def reference(logits: np.ndarray, router_ids: np.ndarray, router_weights: np.ndarray, real: list[bool],
              exact: list[bool], alpha: float, beta: int, normalize: bool, resident: list[bool] | None = None,
              w: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rule, one row and one expert at a time. logits: [T, E] float32 (the router's logits in float32);
    returns (ids [T, K], weights [T, K] float64). Ties in z go to the row's higher logit, then the lower
    expert index; a row whose router picks all survive keeps them (and their weights) as they are."""
    T, E = logits.shape
    K = router_ids.shape[1]
    rows = [b for b in range(T) if real[b]]
    B = len(rows)
    a = np.float32(alpha)
    q = [[max(math.ceil(float(a * (logits[b, e] - logits[b].max()))), -beta) for e in range(E)] for b in range(T)]
    votes = [[Fraction(B) ** q[b][e] for e in range(E)] for b in range(T)]
    S = [sum(votes[b][e] for b in rows) + (w if resident is not None and resident[e] else 0) for e in range(E)]
    kept: set[int] = set()
    for b in rows:
        if exact[b]:
            kept |= set(int(e) for e in router_ids[b])
        else:
            z = [q[b][e] + (S[e] - votes[b][e]) / (B + w) for e in range(E)]
            kept |= set(sorted(range(E), key=lambda e: (-z[e], -logits[b, e], e))[:K])
    ids = np.zeros((T, K), dtype=np.int64)
    weights = np.zeros((T, K), dtype=np.float64)
    for b in range(T):
        src = b
        while not real[src] and src > 0:  # padding copies the last real row before it
            src -= 1
        if exact[src] or all(int(e) in kept for e in router_ids[b]):
            ids[b], weights[b] = router_ids[b], router_weights[b]
            continue
        chosen = sorted(kept, key=lambda e: (-logits[b, e], e))[:K]
        x = logits[b].astype(np.float64)
        p = np.exp(x[chosen] - x[chosen].max())
        p /= p.sum()
        if not normalize:
            full = np.exp(x - x.max())
            full /= full.sum()
            p *= np.sort(full)[::-1][:K].sum()
        ids[b], weights[b] = chosen, p
    return ids, weights


# -- helpers ---------------------------------------------------------------------------------------------------

def router_logits(T: int, E: int, seed: int, dtype=torch.float32, spread: float = 1.5) -> torch.Tensor:
    """Logits shaped like a trained router's: a per-expert preference shared by the batch, plus noise."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(E, generator=g)
    return (shared + spread * torch.randn(T, E, generator=g)).to(dtype)


def ctx(T: int, real: list[bool] | None = None, exact: list[bool] | None = None, slot_table=None,
        prefill: bool = False) -> SelectionContext:
    real_t = torch.tensor(real if real is not None else [True] * T)
    exact_t = torch.tensor(exact if exact is not None else [False] * T)
    return SelectionContext(prefill, real_t, exact_t, slot_table)


def compare(sel: AffinityBinning, r: Routing, c: SelectionContext, resident=None) -> Routing:
    out = sel.select(0, r, c)
    ref_ids, ref_w = reference(r.logits.float().numpy(), r.ids.numpy(), r.weights.float().numpy(),
                               c.real.tolist(), c.exact.tolist(), sel.alpha, sel.beta, sel.router.normalize,
                               resident, sel.resident_weight)
    assert out.ids.dtype == torch.int64 and out.weights.dtype == r.weights.dtype
    np.testing.assert_array_equal(out.ids.numpy(), ref_ids)
    tol = 1e-2 if r.weights.dtype == torch.bfloat16 else 1e-6
    np.testing.assert_allclose(out.weights.float().numpy(), ref_w, rtol=tol, atol=tol)
    return out


def distinct(ids: torch.Tensor, rows=None) -> int:
    return len(torch.unique(ids if rows is None else ids[rows]))


# -- against the reference ---------------------------------------------------------------------------------------

GRID = [
    # T, E, K, alpha, beta
    (1, 8, 2, 3.0, 2),
    (2, 8, 2, 0.7, 1),
    (5, 16, 4, 1.0, 1),
    (8, 32, 4, 3.0, 2),
    (32, 32, 4, 3.0, 2),
    (32, 32, 4, 1.0, 3),
    (32, 64, 8, 3.0, 4),
    (24, 64, 6, 10.0, 2),
    (64, 32, 1, 2.0, 2),
    (16, 8, 2, 0.7, 1),
]


@pytest.mark.parametrize("T,E,K,alpha,beta", GRID)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype,in_model_dtype", [(torch.float32, False), (torch.bfloat16, True),
                                                  (torch.bfloat16, False)])
def test_equals_the_reference(T, E, K, alpha, beta, normalize, dtype, in_model_dtype):
    spec = RouterSpec(K, normalize, in_model_dtype)
    sel = AffinityBinning(alpha, beta, spec)
    for seed in range(3):
        logits = router_logits(T, E, seed=1000 * T + E + seed, dtype=dtype)
        r = route(logits, spec)
        g = np.random.default_rng(seed)
        exact = (g.random(T) < 0.3).tolist() if seed else None  # seed 0: every row asked for LYNX
        out = compare(sel, r, ctx(T, exact=exact))
        for b in range(T):
            assert len(set(out.ids[b].tolist())) == K, "every token runs K distinct experts"
        if normalize:
            torch.testing.assert_close(out.weights.float().sum(-1), torch.ones(T), atol=2e-2, rtol=0)


def test_bfloat16_ties_break_the_same_way():
    """bfloat16 logits tie often; ties in z go to the higher logit and then the lower index, in both."""
    spec = RouterSpec(4, True, True)
    sel = AffinityBinning(3.0, 2, spec)
    logits = (torch.randint(-4, 4, (32, 32)).float() / 4).to(torch.bfloat16)  # few distinct values: many ties
    compare(sel, route(logits, spec), ctx(32))


def test_it_reduces_distinct_experts_on_a_concentrated_batch():
    spec = RouterSpec(4, True, False)
    logits = router_logits(32, 32, seed=7)
    r = route(logits, spec)
    out = AffinityBinning(3.0, 2, spec).select(0, r, ctx(32))
    assert distinct(out.ids) < distinct(r.ids)


# -- the rows it must leave alone ---------------------------------------------------------------------------------

def test_prefill_is_returned_unchanged():
    spec = RouterSpec(4, True, False)
    r = route(router_logits(16, 32, seed=1), spec)
    assert AffinityBinning(3.0, 2, spec).select(0, r, ctx(16, prefill=True)) is r


def test_exact_rows_are_untouched_in_a_mixed_batch():
    spec = RouterSpec(4, False, True)
    sel = AffinityBinning(1.0, 2, spec)
    r = route(router_logits(32, 32, seed=3, dtype=torch.bfloat16), spec)
    exact = [b % 2 == 0 for b in range(32)]
    out = compare(sel, r, ctx(32, exact=exact))
    rows = torch.tensor(exact)
    assert torch.equal(out.ids[rows], r.ids[rows]) and torch.equal(out.weights[rows], r.weights[rows])
    assert not torch.equal(out.ids[~rows], r.ids[~rows]), "the LYNX rows were remapped"


def test_all_exact_rows_come_out_as_routed():
    spec = RouterSpec(4, True, False)
    r = route(router_logits(8, 32, seed=4), spec)
    out = AffinityBinning(3.0, 2, spec).select(0, r, ctx(8, exact=[True] * 8))
    assert torch.equal(out.ids, r.ids) and torch.equal(out.weights, r.weights)


@pytest.mark.parametrize("exact_last", [False, True])
def test_padding_rows_are_ignored_and_copy_their_source(exact_last):
    """A graph pads B real rows to its bucket with copies of the last real row (marked real=False, exact=True
    by the record): the real rows choose what they choose unpadded, and the copies choose what it chooses."""
    spec = RouterSpec(4, True, False)
    sel = AffinityBinning(3.0, 2, spec)
    B, T = 21, 24
    logits = router_logits(B, 32, seed=5)
    exact = [b % 5 == 0 for b in range(B)]
    exact[-1] = exact_last
    eager = sel.select(0, route(logits, spec), ctx(B, exact=exact))
    padded_logits = torch.cat([logits, logits[-1:].expand(T - B, -1)])
    graph = compare(sel, route(padded_logits, spec), ctx(T, real=[True] * B + [False] * (T - B),
                                                         exact=exact + [True] * (T - B)))
    assert torch.equal(graph.ids[:B], eager.ids) and torch.equal(graph.weights[:B], eager.weights)
    for b in range(B, T):
        assert torch.equal(graph.ids[b], eager.ids[-1]) and torch.equal(graph.weights[b], eager.weights[-1])


# -- limits ---------------------------------------------------------------------------------------------------------

def test_one_real_row_is_routed_exactly():
    spec = RouterSpec(4, True, False)
    for seed in range(20):
        r = route(router_logits(1, 32, seed=seed), spec)
        out = AffinityBinning(3.0, 2, spec).select(0, r, ctx(1))
        assert torch.equal(out.ids, r.ids) and torch.equal(out.weights, r.weights)


def test_alpha_to_zero_is_exact_routing():
    """One bin holds every expert and every row votes for all alike: only the rows' own logits decide."""
    spec = RouterSpec(4, False, False)
    r = route(router_logits(32, 32, seed=8), spec)
    out = compare(AffinityBinning(1e-9, 2, spec), r, ctx(32))
    assert torch.equal(out.ids, r.ids) and torch.equal(out.weights, r.weights)


def test_bins_finer_than_every_gap_are_exact_routing():
    """alpha -> infinity is exact only with beta growing too: once every expert of a row sits in a bin of its
    own (alpha past the logit gaps, beta past the range), nothing can move across a bin. Logits on a grid of
    0.1 with alpha=20 (bins of 0.05) and beta=16 (0.8 of range: all 8 experts) show it."""
    spec = RouterSpec(2, True, False)
    g = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randperm(8, generator=g).float() * 0.1 for _ in range(4)])
    r = route(logits, spec)
    out = compare(AffinityBinning(20.0, 16, spec), r, ctx(4))
    assert torch.equal(out.ids, r.ids)


def test_large_alpha_at_a_fixed_beta_is_not_exact():
    """The clamp bin -beta takes every expert but the row's best once alpha is large: popularity then picks the
    other K-1. Finer bins mean fewer changes only while a row's top-K stay above the clamp bin."""
    spec = RouterSpec(4, True, False)
    r = route(router_logits(32, 32, seed=9), spec)
    out = compare(AffinityBinning(1e9, 2, spec), r, ctx(32))
    assert torch.equal(out.ids[:, 0], r.ids[:, 0]), "the best expert of every row stays"
    assert distinct(out.ids) < distinct(r.ids)


# -- cache-aware ----------------------------------------------------------------------------------------------------

def test_resident_experts_win_inside_a_bin():
    """Row 0's second and third experts share bin 0 and have equal popularity: plain LYNX keeps the row's own
    order (expert 1), the cache-aware variant takes the resident one (expert 2)."""
    spec = RouterSpec(2, True, False)
    logits = torch.full((2, 8), -4.0)
    logits[0, :3] = torch.tensor([5.0, 4.9, 4.85])
    logits[1, 3:5] = torch.tensor([5.0, 4.95])
    r = route(logits, spec)
    table = torch.tensor([0, -1, 3, -1, -1, -1, -1, -1], dtype=torch.int32)
    plain = compare(AffinityBinning(3.0, 2, spec), r, ctx(2, slot_table=table))
    assert plain.ids[0].tolist() == [0, 1]
    aware = compare(AffinityBinning(3.0, 2, spec, resident_weight=1), r, ctx(2, slot_table=table),
                    resident=(table >= 0).tolist())
    assert aware.ids[0].tolist() == [0, 2] and aware.ids[1].tolist() == [3, 4]


def test_resident_weight_moves_picks_onto_resident_experts():
    spec = RouterSpec(4, True, False)
    g = torch.Generator().manual_seed(11)
    on_device = on_device_plain = 0
    for seed in range(5):
        r = route(router_logits(32, 32, seed=100 + seed), spec)
        table = torch.where(torch.rand(32, generator=g) < 0.5, 1, -1).to(torch.int32)
        resident = (table >= 0).tolist()
        for w in (0, 4):
            out = compare(AffinityBinning(3.0, 2, spec, resident_weight=w), r, ctx(32, slot_table=table),
                          resident=resident if w else None)
            share = (table[out.ids] >= 0).sum().item()
            if w:
                on_device += share
            else:
                on_device_plain += share
    assert on_device > on_device_plain


def test_resident_weight_is_inert_when_everything_is_resident_or_zero():
    spec = RouterSpec(4, True, False)
    r = route(router_logits(32, 32, seed=12), spec)
    plain = AffinityBinning(3.0, 2, spec).select(0, r, ctx(32))
    table = torch.where(torch.arange(32) % 3 == 0, 1, -1).to(torch.int32)
    for sel, c in ((AffinityBinning(3.0, 2, spec, resident_weight=5), ctx(32)),  # no table: all resident
                   (AffinityBinning(3.0, 2, spec), ctx(32, slot_table=table))):
        out = sel.select(0, r, c)
        assert torch.equal(out.ids, plain.ids) and torch.equal(out.weights, plain.weights)


# -- parameters and defaults ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=-1.0), dict(alpha=float("inf")), dict(beta=0),
                                dict(beta=1.5), dict(resident_weight=-1), dict(resident_weight=0.5),
                                dict(rows_per_program=0), dict(rows_per_program=2.0), dict(rows_per_program=True),
                                dict(rows_per_program="many"), dict(rows_per_program=3)])
def test_bad_parameters_are_refused(kw):
    args = dict(alpha=3.0, beta=2, router=RouterSpec(4, True, False)) | kw
    with pytest.raises(ConfigError):
        AffinityBinning(**args)


def test_keys_too_wide_for_int64_are_refused_with_a_reason():
    spec = RouterSpec(4, True, False)
    r = route(router_logits(256, 32, seed=0), spec)
    with pytest.raises(ConfigError, match="smaller beta"):
        AffinityBinning(3.0, 9, spec).select(0, r, ctx(256))


def test_defaults_by_family_and_for_the_bundled_model():
    from moeflow.assets import default_model_dir
    from moeflow.weights.checkpoint import Checkpoint
    import dataclasses

    tiny = Checkpoint(default_model_dir()).spec
    sel = AffinityBinning.for_spec(tiny)
    assert (sel.alpha, sel.beta) == lynx_defaults(tiny) and sel.router == tiny.router and sel.name == "lynx"
    assert AffinityBinning.for_spec(tiny, alpha=5.0).alpha == 5.0
    assert AffinityBinning.for_spec(tiny, beta=3).beta == 3
    qwen3 = dataclasses.replace(tiny, hidden_size=2048, num_layers=48, num_experts=128)
    assert lynx_defaults(qwen3) == (3.0, 2)
    assert lynx_defaults(dataclasses.replace(qwen3, family="qwen2_moe")) == (3.0, 4)
    assert lynx_defaults(dataclasses.replace(qwen3, family="mixtral", hidden_size=4096)) == (0.7, 1)
    assert lynx_defaults(dataclasses.replace(qwen3, family="mixtral", hidden_size=6144)) == (1.0, 1)
    assert lynx_defaults(dataclasses.replace(qwen3, family="olmoe")) == (3.0, 2)
    bench = dataclasses.replace(tiny, hidden_size=2048, num_layers=12, num_experts=64,
                                router=dataclasses.replace(tiny.router, top_k=8))
    assert lynx_defaults(bench) == (5.0, 1), "the bench preset's measured defaults"
    assert lynx_defaults(dataclasses.replace(bench, num_layers=48)) == (3.0, 2), "only that shape"


def test_the_kernel_is_spread_over_programs_from_32_rows_unless_told():
    sel = AffinityBinning(3.0, 2, RouterSpec(4, True, False))
    assert sel.rows_per_program == "auto"
    assert [sel.rows_for(T) for T in (1, 16, 31, 32, 64, 128)] == [None, None, None, 2, 2, 2]
    assert AffinityBinning(3.0, 2, RouterSpec(4, True, False), rows_per_program=None).rows_for(64) is None
    assert AffinityBinning(3.0, 2, RouterSpec(4, True, False), rows_per_program=8).rows_for(16) == 8


# -- under a CUDA graph (the engine's runs: test_lynx_engine.py) ----------------------------------------------

@pytest.mark.gpu
def test_under_a_cuda_graph_it_chooses_what_it_chooses_eagerly():
    """Captured once (router and selector) against static buffers, replayed with new logits, masks and slot
    table: the same ids and weights as an eager call, and the ids of the CPU reference."""
    dev = torch.device("cuda")
    T, E, K = 48, 64, 8
    for dtype, in_model_dtype in ((torch.float32, False), (torch.bfloat16, True)):
        spec = RouterSpec(K, False, in_model_dtype)
        sel = AffinityBinning(3.0, 2, spec, resident_weight=2)
        logits = torch.zeros(T, E, dtype=dtype, device=dev)
        real = torch.ones(T, dtype=torch.bool, device=dev)
        exact = torch.zeros(T, dtype=torch.bool, device=dev)
        table = torch.full((E,), -1, dtype=torch.int32, device=dev)

        def step():
            return sel.select(0, route(logits, spec), SelectionContext(False, real, exact, table))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        g = np.random.default_rng(0)
        for seed in range(6):
            B = T - 3 * (seed % 3)  # 0, 3 or 6 padding rows, copies of the last real row
            new = router_logits(B, E, seed=seed, dtype=dtype)
            logits.copy_(torch.cat([new, new[-1:].expand(T - B, -1)]))
            real.copy_(torch.arange(T) < B)
            exact_rows = torch.tensor(g.random(T) < 0.25) | ~(torch.arange(T) < B)
            exact.copy_(exact_rows)
            table.copy_(torch.where(torch.tensor(g.random(E) < 0.5), 1, -1).to(torch.int32))
            graph.replay()
            eager = step()
            torch.cuda.synchronize()
            assert torch.equal(out.ids, eager.ids) and torch.equal(out.weights, eager.weights)
            r = route(logits, spec)
            ref_ids, ref_w = reference(logits.float().cpu().numpy(), r.ids.cpu().numpy(),
                                       r.weights.float().cpu().numpy(), real.tolist(), exact.tolist(), sel.alpha,
                                       sel.beta, False, (table >= 0).tolist(), sel.resident_weight)
            np.testing.assert_array_equal(out.ids.cpu().numpy(), ref_ids)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            np.testing.assert_allclose(out.weights.float().cpu().numpy(), ref_w, rtol=tol, atol=tol)
