"""AffinityBinning in Triton (`AffinityBinning(kernel="triton")`): one program per call, or spread over programs.

The torch selector in routing/lynx.py is some thirty small tensor operations per MoE layer; on the H200 at
batch 32 they cost more than the expert weight reads LYNX saves (docs/benchmarks/2026-12-02-h200-session2).
This kernel computes the same thing in one launch: the step's [T, E] logits sit in one program's registers
(T rows padded to BT, E experts to BE, both powers of two), and the rule runs as written in lynx.py:

- bins q = max(ceil(alpha * (L - max L)), -beta) and votes T ** (q + beta), as int64;
- popularity: the real rows' votes per expert, less the row's own, plus w * T ** beta if resident;
- each row's K candidates by (bin * scale + popularity) descending, ties to the higher logit, then the lower
  index: the order of lynx.py's unique int64 key, found by K rounds of max instead of a sort;
- kept: candidates of real LYNX rows and picks of real exact rows; a row whose picks are all kept (or whose
  source row is exact) keeps the router's ids and weights; any other takes its K best-logit kept experts,
  softmax-weighted in float32 (times the row's top-K mass where the family does not renormalise).

Ids equal lynx.py's; weights equal up to float32 rounding of the softmax's sum. A padding row's choice is
computed from the row it copies (its logits and picks), so it is that row's, written in place: the record's
buffers can be the output (SelectionContext.out) with no copy after, where the torch selector's padding rows
are copied from their source rows by RouteRecord.write_selected.

On an H100 the one program took 28-32 us a layer at 32-64 rows (2026-12-05, tools/kernel_profile.py), 12% of a
resident batch-64 step: a single program's K rounds of row reductions over the whole block.
`affinity_binning(rows_per_program=n)` spreads the same rule over programs of n rows in two launches: the first
finds each program's candidates, every program summing the popularity over all rows itself, and ORs them into a
kept set [E] by atomics; the second writes each row's choice from that set. Both share every step of the rule
(the @triton.jit helpers below), so their ids are equal whatever n.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except (ImportError, OSError, RuntimeError):  # a broken install counts as absent
    triton = None

MAX_ROWS = 256
MAX_EXPERTS = 256


def available() -> bool:
    return triton is not None


if triton is not None:

    NEG = tl.constexpr(-4611686018427387904)  # below every key

    @triton.jit
    def _logits(logits_ptr, t, tm, e, em, stride_l):
        """The rows t of the step's logits [rows, BE] in float32 (-inf past T or E; + 0.0 turns -0.0 into 0.0)."""
        m2 = tm[:, None] & em[None, :]
        L = tl.load(logits_ptr + t[:, None] * stride_l + e[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        return L + 0.0, m2

    @triton.jit
    def _bins(L, m2, alpha, T, BETA: tl.constexpr):
        """(bin, vote) of each logit: bin = max(ceil(alpha (L - max L)), -beta) + beta in 0..BETA, vote T ** bin
        as int64."""
        rowmax = tl.max(L, axis=1)
        q = tl.maximum(tl.ceil((L - rowmax[:, None]) * alpha), -BETA)
        qi = tl.where(m2, q, -BETA).to(tl.int64) + BETA
        votes = tl.full(L.shape, 1, tl.int64)
        for i in tl.static_range(BETA):
            votes = tl.where(qi > i, votes * T, votes)
        return qi, votes

    @triton.jit
    def _popularity(pop, votes, qi, m2, e, em, slot_ptr, scale, bonus, HAS_SLOTS: tl.constexpr):
        """Each row's key per expert: bin * scale + the other real rows' votes (+ bonus where resident)."""
        popularity = pop[None, :] - votes
        if HAS_SLOTS:
            resident = tl.load(slot_ptr + e, mask=em, other=-1) >= 0
            popularity = popularity + tl.where(resident, bonus, 0)[None, :]
        return tl.where(m2, qi * scale + popularity, NEG)

    @triton.jit
    def _votes_kept(key, L, t, tm, e, real, exact, ids_ptr, K: tl.constexpr, BE: tl.constexpr):
        """[rows, BE]: the K candidates of each real LYNX row (best key first, ties to the higher logit, then the
        lower index: K rounds of max instead of a sort) and the picks of each real exact row."""
        proposed = tl.zeros(L.shape, dtype=tl.int1)
        for _ in tl.static_range(K):
            top = tl.max(key, axis=1)
            tie = key == top[:, None]
            best = tl.max(tl.where(tie, L, float("-inf")), axis=1)
            pick = tl.min(tl.where(tie & (L == best[:, None]), e[None, :], BE), axis=1)
            hit = e[None, :] == pick[:, None]
            proposed = proposed | hit
            key = tl.where(hit, NEG, key)
        picked = tl.zeros(L.shape, dtype=tl.int1)
        for k in tl.static_range(K):
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
            picked = picked | (e[None, :] == rid[:, None])
        return (proposed & (real & ~exact)[:, None]) | (picked & (real & exact)[:, None])

    @triton.jit
    def _write_choice(logits_ptr, stride_l, kept, t, tm, e, em, real_ptr, exact_ptr, ids_ptr, w_ptr, out_ids_ptr,
                      out_w_ptr, T, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, NORMALIZE: tl.constexpr):
        """Rows t's choice given the step's kept experts [BE]: the router's ids and weights where all its picks
        are kept or the row it copies (itself when real, else the last real row before it) is exact; else its K
        best-logit kept experts, softmax-weighted in float32 (times its top-K mass where not renormalised)."""
        u = tl.arange(0, BT)
        real_all = tl.load(real_ptr + u, mask=u < T, other=0) != 0
        src = tl.maximum(tl.max(tl.where(real_all[None, :] & (u[None, :] <= t[:, None]), u[None, :], -1), axis=1), 0)
        # each row's choice is its source row's, computed from that row's logits and picks: a padding row writes
        # the very choice of the row it copies, so the record needs no copy after (RouteRecord.write_selected)
        L, m2 = _logits(logits_ptr, src, tm, e, em, stride_l)
        keep = tl.load(exact_ptr + src, mask=tm, other=1) != 0
        all_kept = tl.full(t.shape, 1, tl.int1)
        for k in tl.static_range(K):
            rid = tl.load(ids_ptr + src * K + k, mask=tm, other=-1)
            there = tl.max(((e[None, :] == rid[:, None]) & kept[None, :]).to(tl.int32), axis=1) > 0
            all_kept = all_kept & there
        keep = keep | all_kept

        # the K best-logit kept experts of each row: the softmax's denominator first, then the picks
        masked = tl.where(kept[None, :] & m2, L, float("-inf"))
        first = tl.max(masked, axis=1)
        denom = tl.zeros(t.shape, dtype=tl.float32)
        scan = masked
        for _ in tl.static_range(K):
            best = tl.max(scan, axis=1)
            pick = tl.min(tl.where(scan == best[:, None], e[None, :], BE), axis=1)
            denom += tl.exp(best - first)
            scan = tl.where(e[None, :] == pick[:, None], float("-inf"), scan)
        mass = tl.full(t.shape, 1.0, tl.float32)
        if not NORMALIZE:  # the row's original top-K probability mass
            rowmax = tl.max(L, axis=1)
            full = tl.sum(tl.where(m2, tl.exp(L - rowmax[:, None]), 0.0), axis=1)
            mine = tl.zeros(t.shape, dtype=tl.float32)
            for k in tl.static_range(K):
                rid = tl.load(ids_ptr + src * K + k, mask=tm, other=-1)
                mine += tl.sum(tl.where(e[None, :] == rid[:, None], tl.exp(L - rowmax[:, None]), 0.0), axis=1)
            mass = mine / full
        scan = masked
        for k in tl.static_range(K):
            best = tl.max(scan, axis=1)
            pick = tl.min(tl.where(scan == best[:, None], e[None, :], BE), axis=1)
            scan = tl.where(e[None, :] == pick[:, None], float("-inf"), scan)
            weight = tl.exp(best - first) / denom * mass
            rid = tl.load(ids_ptr + src * K + k, mask=tm, other=0)
            rw = tl.load(w_ptr + src * K + k, mask=tm, other=0.0)
            out_id = tl.where(keep, rid, pick.to(tl.int64))
            out_w = tl.where(keep, rw.to(tl.float32), weight)
            tl.store(out_ids_ptr + t * K + k, out_id, mask=tm)
            tl.store(out_w_ptr + t * K + k, out_w.to(out_w_ptr.dtype.element_ty), mask=tm)

    @triton.jit
    def _affinity_binning(logits_ptr, ids_ptr, w_ptr, real_ptr, exact_ptr, slot_ptr, out_ids_ptr, out_w_ptr,
                          T, E, stride_l, alpha, scale, bonus,
                          K: tl.constexpr, BETA: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                          HAS_SLOTS: tl.constexpr, NORMALIZE: tl.constexpr):
        """The whole step in one program."""
        t = tl.arange(0, BT)
        e = tl.arange(0, BE)
        tm = t < T
        em = e < E
        L, m2 = _logits(logits_ptr, t, tm, e, em, stride_l)
        real = tl.load(real_ptr + t, mask=tm, other=0) != 0
        exact = tl.load(exact_ptr + t, mask=tm, other=1) != 0
        qi, votes = _bins(L, m2, alpha, T, BETA)
        pop = tl.sum(tl.where(real[:, None] & m2, votes, 0), axis=0)
        key = _popularity(pop, votes, qi, m2, e, em, slot_ptr, scale, bonus, HAS_SLOTS)
        kept = tl.max(_votes_kept(key, L, t, tm, e, real, exact, ids_ptr, K, BE).to(tl.int32), axis=0) > 0
        _write_choice(logits_ptr, stride_l, kept, t, tm, e, em, real_ptr, exact_ptr, ids_ptr, w_ptr, out_ids_ptr,
                      out_w_ptr, T, K, BT, BE, NORMALIZE)

    @triton.jit
    def _lynx_propose(logits_ptr, ids_ptr, real_ptr, exact_ptr, slot_ptr, kept_ptr, T, E, stride_l, alpha, scale,
                      bonus, K: tl.constexpr, BETA: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
                      BE: tl.constexpr, HAS_SLOTS: tl.constexpr):
        """Spread, first launch: rows pid * RB ..'s candidates (or picks) OR-ed into kept [E]. Every program sums
        the popularity over all T rows itself, CH rows at a time."""
        e = tl.arange(0, BE)
        em = e < E
        pop = tl.zeros([BE], dtype=tl.int64)
        for t0 in range(0, T, CH):
            c = t0 + tl.arange(0, CH)
            cm = c < T
            Lc, mc = _logits(logits_ptr, c, cm, e, em, stride_l)
            _, votes_c = _bins(Lc, mc, alpha, T, BETA)
            real_c = tl.load(real_ptr + c, mask=cm, other=0) != 0
            pop += tl.sum(tl.where(real_c[:, None] & mc, votes_c, 0), axis=0)
        t = tl.program_id(0) * RB + tl.arange(0, RB)
        tm = t < T
        L, m2 = _logits(logits_ptr, t, tm, e, em, stride_l)
        real = tl.load(real_ptr + t, mask=tm, other=0) != 0
        exact = tl.load(exact_ptr + t, mask=tm, other=1) != 0
        qi, votes = _bins(L, m2, alpha, T, BETA)
        key = _popularity(pop, votes, qi, m2, e, em, slot_ptr, scale, bonus, HAS_SLOTS)
        mine = tl.max(_votes_kept(key, L, t, tm, e, real, exact, ids_ptr, K, BE).to(tl.int32), axis=0)
        tl.atomic_max(kept_ptr + e, mine, mask=em & (mine > 0))

    @triton.jit
    def _lynx_apply(logits_ptr, ids_ptr, w_ptr, real_ptr, exact_ptr, kept_ptr, out_ids_ptr, out_w_ptr, T, E,
                    stride_l, K: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                    NORMALIZE: tl.constexpr):
        """Spread, second launch: rows pid * RB ..'s choice given the kept experts the first launch found."""
        t = tl.program_id(0) * RB + tl.arange(0, RB)
        e = tl.arange(0, BE)
        tm = t < T
        em = e < E
        kept = tl.load(kept_ptr + e, mask=em, other=0) > 0
        _write_choice(logits_ptr, stride_l, kept, t, tm, e, em, real_ptr, exact_ptr, ids_ptr, w_ptr, out_ids_ptr,
                      out_w_ptr, T, K, BT, BE, NORMALIZE)


def affinity_binning(logits: torch.Tensor, router_ids: torch.Tensor, router_weights: torch.Tensor,
                     real: torch.Tensor, exact: torch.Tensor, slot_table: torch.Tensor | None, alpha: float,
                     beta: int, scale: int, bonus: int, normalize: bool,
                     rows_per_program: int | None = None,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, K] int64, weights [T, K] in the router's weight dtype): lynx.py's rule in one launch, or two, each
    padding row (not `real`) taking the choice of the real row it copies (the last one before it).
    scale and bonus: lynx.py's (T + w) * T ** beta and w * T ** beta.
    rows_per_program: None, one program for the whole step; n (a power of two), the rule spread over programs of
    n rows each in two launches and a zeroed [E] buffer (each program sums the popularity over all rows itself;
    the kept set is OR-ed across programs by atomics, so the ids are the same whatever n).
    out: contiguous (ids, weights) buffers of those shapes and dtypes to write into and return (SelectionContext.out);
    default new ones. kept: a contiguous [E] int32 buffer of zeros the spread launches may use for the kept set
    (SelectionContext.scratch; left holding it); default a new zeroed one, one more kernel a call."""
    T, E = logits.shape
    K = router_ids.shape[1]
    if T > MAX_ROWS or E > MAX_EXPERTS:
        raise ValueError(f"the LYNX kernel takes at most {MAX_ROWS} rows and {MAX_EXPERTS} experts, got {T} x {E}")
    if out is not None:
        ids, weights = out
        if (ids.shape != (T, K) or weights.shape != (T, K) or ids.dtype != torch.int64
                or weights.dtype != router_weights.dtype or not (ids.is_contiguous() and weights.is_contiguous())):
            raise ValueError(f"out must be contiguous [{T}, {K}] int64 ids and {router_weights.dtype} weights")
    else:
        ids = torch.empty(T, K, dtype=torch.int64, device=logits.device)
        weights = torch.empty(T, K, dtype=router_weights.dtype, device=logits.device)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    BT = max(16, triton.next_power_of_2(T))
    BE = max(16, triton.next_power_of_2(E))
    slots = slot_table if slot_table is not None else real  # not read when HAS_SLOTS is off
    has_slots = slot_table is not None and bonus > 0
    router_ids, router_weights = router_ids.contiguous(), router_weights.contiguous()
    if rows_per_program:
        RB = rows_per_program
        if kept is None:
            kept = torch.zeros(E, dtype=torch.int32, device=logits.device)
        elif kept.shape != (E,) or kept.dtype != torch.int32 or not kept.is_contiguous():
            raise ValueError(f"kept must be a contiguous [{E}] int32 buffer of zeros")
        grid = (triton.cdiv(T, RB),)
        _lynx_propose[grid](logits, router_ids, real, exact, slots, kept, T, E, logits.stride(0), float(alpha),
                            scale, bonus, K=K, BETA=beta, RB=RB, CH=16, BE=BE, HAS_SLOTS=has_slots, num_warps=2)
        _lynx_apply[grid](logits, router_ids, router_weights, real, exact, kept, ids, weights, T, E,
                          logits.stride(0), K=K, RB=RB, BT=BT, BE=BE, NORMALIZE=normalize, num_warps=2)
        return ids, weights
    _affinity_binning[(1,)](logits, router_ids, router_weights, real, exact, slots, ids,
                            weights, T, E, logits.stride(0), float(alpha), scale, bonus, K=K, BETA=beta, BT=BT,
                            BE=BE, HAS_SLOTS=has_slots, NORMALIZE=normalize,
                            num_warps=8 if BT * BE >= 4096 else 4)
    return ids, weights
