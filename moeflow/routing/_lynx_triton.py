"""AffinityBinning in one Triton program per call (`AffinityBinning(kernel="triton")`).

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

Ids equal lynx.py's; weights equal up to float32 rounding of the softmax's sum. Padding rows take their
source row's choice later (RouteRecord.write_selected), as with the torch selector.
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

    @triton.jit
    def _affinity_binning(logits_ptr, ids_ptr, w_ptr, real_ptr, exact_ptr, slot_ptr, out_ids_ptr, out_w_ptr,
                          T, E, stride_l, alpha, scale, bonus,
                          K: tl.constexpr, BETA: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                          HAS_SLOTS: tl.constexpr, NORMALIZE: tl.constexpr):
        NEG: tl.constexpr = -4611686018427387904  # below every key
        t = tl.arange(0, BT)
        e = tl.arange(0, BE)
        tm = t < T
        em = e < E
        m2 = tm[:, None] & em[None, :]
        L = tl.load(logits_ptr + t[:, None] * stride_l + e[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        L = L + 0.0
        real = tl.load(real_ptr + t, mask=tm, other=0) != 0
        exact = tl.load(exact_ptr + t, mask=tm, other=1) != 0
        rowmax = tl.max(L, axis=1)
        q = tl.maximum(tl.ceil((L - rowmax[:, None]) * alpha), -BETA)
        qi = tl.where(m2, q, -BETA).to(tl.int64) + BETA  # 0 .. BETA
        votes = tl.full([BT, BE], 1, tl.int64)
        for i in tl.static_range(BETA):
            votes = tl.where(qi > i, votes * T, votes)
        pop = tl.sum(tl.where(real[:, None] & m2, votes, 0), axis=0)
        popularity = pop[None, :] - votes
        if HAS_SLOTS:
            resident = tl.load(slot_ptr + e, mask=em, other=-1) >= 0
            popularity = popularity + tl.where(resident, bonus, 0)[None, :]
        key = tl.where(m2, qi * scale + popularity, NEG)

        # each row's K candidates, best key first
        proposed = tl.zeros([BT, BE], dtype=tl.int1)
        for _ in tl.static_range(K):
            top = tl.max(key, axis=1)
            tie = key == top[:, None]
            best = tl.max(tl.where(tie, L, float("-inf")), axis=1)
            pick = tl.min(tl.where(tie & (L == best[:, None]), e[None, :], BE), axis=1)
            hit = e[None, :] == pick[:, None]
            proposed = proposed | hit
            key = tl.where(hit, NEG, key)

        picked = tl.zeros([BT, BE], dtype=tl.int1)
        for k in tl.static_range(K):
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
            picked = picked | (e[None, :] == rid[:, None])
        lynx_rows = real & ~exact
        exact_rows = real & exact
        votes_kept = (proposed & lynx_rows[:, None]) | (picked & exact_rows[:, None])
        kept = tl.max(votes_kept.to(tl.int32), axis=0) > 0  # [BE]

        # the row each row copies: itself when real, else the last real row before it
        u = tl.arange(0, BT)
        src = tl.max(tl.where(real[None, :] & (u[None, :] <= t[:, None]), u[None, :], -1), axis=1)
        src = tl.maximum(src, 0)
        keep = tl.load(exact_ptr + src, mask=tm, other=1) != 0
        all_kept = tl.full([BT], 1, tl.int1)
        for k in tl.static_range(K):
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
            there = tl.max(((e[None, :] == rid[:, None]) & kept[None, :]).to(tl.int32), axis=1) > 0
            all_kept = all_kept & there
        keep = keep | all_kept

        # the K best-logit kept experts of each row: the softmax's denominator first, then the picks
        masked = tl.where(kept[None, :] & m2, L, float("-inf"))
        first = tl.max(masked, axis=1)
        denom = tl.zeros([BT], dtype=tl.float32)
        scan = masked
        for _ in tl.static_range(K):
            best = tl.max(scan, axis=1)
            pick = tl.min(tl.where(scan == best[:, None], e[None, :], BE), axis=1)
            denom += tl.exp(best - first)
            scan = tl.where(e[None, :] == pick[:, None], float("-inf"), scan)
        mass = tl.full([BT], 1.0, tl.float32)
        if not NORMALIZE:  # the row's original top-K probability mass
            full = tl.sum(tl.where(m2, tl.exp(L - rowmax[:, None]), 0.0), axis=1)
            mine = tl.zeros([BT], dtype=tl.float32)
            for k in tl.static_range(K):
                rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
                mine += tl.sum(tl.where(e[None, :] == rid[:, None], tl.exp(L - rowmax[:, None]), 0.0), axis=1)
            mass = mine / full
        scan = masked
        for k in tl.static_range(K):
            best = tl.max(scan, axis=1)
            pick = tl.min(tl.where(scan == best[:, None], e[None, :], BE), axis=1)
            scan = tl.where(e[None, :] == pick[:, None], float("-inf"), scan)
            weight = tl.exp(best - first) / denom * mass
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=0)
            rw = tl.load(w_ptr + t * K + k, mask=tm, other=0.0)
            out_id = tl.where(keep, rid, pick.to(tl.int64))
            out_w = tl.where(keep, rw.to(tl.float32), weight)
            tl.store(out_ids_ptr + t * K + k, out_id, mask=tm)
            tl.store(out_w_ptr + t * K + k, out_w.to(out_w_ptr.dtype.element_ty), mask=tm)


    @triton.jit
    def _bins(L, m2, alpha, T, BETA: tl.constexpr):
        """(bin index 0..BETA, votes T ** bin as int64) of logits L [rows, BE], -inf where masked."""
        rowmax = tl.max(L, axis=1)
        q = tl.maximum(tl.ceil((L - rowmax[:, None]) * alpha), -BETA)
        qi = tl.where(m2, q, -BETA).to(tl.int64) + BETA
        votes = tl.full(L.shape, 1, tl.int64)
        for i in tl.static_range(BETA):
            votes = tl.where(qi > i, votes * T, votes)
        return qi, votes, rowmax

    @triton.jit
    def _lynx_propose(logits_ptr, ids_ptr, real_ptr, exact_ptr, slot_ptr, kept_ptr, T, E, stride_l, alpha, scale,
                      bonus, K: tl.constexpr, BETA: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
                      BE: tl.constexpr, HAS_SLOTS: tl.constexpr):
        """Rows pid * RB ..: their K candidates (LYNX rows) or picks (exact rows), OR-ed into kept [E]. Every
        program sums the popularity over all T rows itself, CH rows at a time."""
        e = tl.arange(0, BE)
        em = e < E
        pop = tl.zeros([BE], dtype=tl.int64)
        for t0 in range(0, T, CH):
            c = t0 + tl.arange(0, CH)
            cm = c < T
            m2 = cm[:, None] & em[None, :]
            Lc = tl.load(logits_ptr + c[:, None] * stride_l + e[None, :], mask=m2, other=float("-inf"))
            Lc = Lc.to(tl.float32) + 0.0
            _, votes, _ = _bins(Lc, m2, alpha, T, BETA)
            real_c = tl.load(real_ptr + c, mask=cm, other=0) != 0
            pop += tl.sum(tl.where(real_c[:, None] & m2, votes, 0), axis=0)
        t = tl.program_id(0) * RB + tl.arange(0, RB)
        tm = t < T
        m2 = tm[:, None] & em[None, :]
        L = tl.load(logits_ptr + t[:, None] * stride_l + e[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        L = L + 0.0
        qi, votes, _ = _bins(L, m2, alpha, T, BETA)
        popularity = pop[None, :] - votes
        if HAS_SLOTS:
            resident = tl.load(slot_ptr + e, mask=em, other=-1) >= 0
            popularity = popularity + tl.where(resident, bonus, 0)[None, :]
        key = tl.where(m2, qi * scale + popularity, -4611686018427387904)
        proposed = tl.zeros([RB, BE], dtype=tl.int1)
        for _ in tl.static_range(K):
            top = tl.max(key, axis=1)
            tie = key == top[:, None]
            best = tl.max(tl.where(tie, L, float("-inf")), axis=1)
            pick = tl.min(tl.where(tie & (L == best[:, None]), e[None, :], BE), axis=1)
            hit = e[None, :] == pick[:, None]
            proposed = proposed | hit
            key = tl.where(hit, -4611686018427387904, key)
        picked = tl.zeros([RB, BE], dtype=tl.int1)
        for k in tl.static_range(K):
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
            picked = picked | (e[None, :] == rid[:, None])
        real = tl.load(real_ptr + t, mask=tm, other=0) != 0
        exact = tl.load(exact_ptr + t, mask=tm, other=1) != 0
        votes_kept = (proposed & (real & ~exact)[:, None]) | (picked & (real & exact)[:, None])
        mine = tl.max(votes_kept.to(tl.int32), axis=0)
        tl.atomic_max(kept_ptr + e, mine, mask=em & (mine > 0))

    @triton.jit
    def _lynx_apply(logits_ptr, ids_ptr, w_ptr, real_ptr, exact_ptr, kept_ptr, out_ids_ptr, out_w_ptr, T, E,
                    stride_l, K: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                    NORMALIZE: tl.constexpr):
        """Rows pid * RB ..: the router's choice where all its picks are kept (or its source row is exact),
        else its K best-logit kept experts, softmax-weighted (as the one-program kernel's second half)."""
        t = tl.program_id(0) * RB + tl.arange(0, RB)
        e = tl.arange(0, BE)
        tm = t < T
        em = e < E
        m2 = tm[:, None] & em[None, :]
        L = tl.load(logits_ptr + t[:, None] * stride_l + e[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        L = L + 0.0
        rowmax = tl.max(L, axis=1)
        kept = tl.load(kept_ptr + e, mask=em, other=0) > 0
        u = tl.arange(0, BT)
        real_all = tl.load(real_ptr + u, mask=u < T, other=0) != 0
        src = tl.max(tl.where(real_all[None, :] & (u[None, :] <= t[:, None]), u[None, :], -1), axis=1)
        src = tl.maximum(src, 0)
        keep = tl.load(exact_ptr + src, mask=tm, other=1) != 0
        all_kept = tl.full([RB], 1, tl.int1)
        for k in tl.static_range(K):
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
            there = tl.max(((e[None, :] == rid[:, None]) & kept[None, :]).to(tl.int32), axis=1) > 0
            all_kept = all_kept & there
        keep = keep | all_kept
        masked = tl.where(kept[None, :] & m2, L, float("-inf"))
        first = tl.max(masked, axis=1)
        denom = tl.zeros([RB], dtype=tl.float32)
        scan = masked
        for _ in tl.static_range(K):
            best = tl.max(scan, axis=1)
            pick = tl.min(tl.where(scan == best[:, None], e[None, :], BE), axis=1)
            denom += tl.exp(best - first)
            scan = tl.where(e[None, :] == pick[:, None], float("-inf"), scan)
        mass = tl.full([RB], 1.0, tl.float32)
        if not NORMALIZE:
            full = tl.sum(tl.where(m2, tl.exp(L - rowmax[:, None]), 0.0), axis=1)
            mine = tl.zeros([RB], dtype=tl.float32)
            for k in tl.static_range(K):
                rid = tl.load(ids_ptr + t * K + k, mask=tm, other=-1)
                mine += tl.sum(tl.where(e[None, :] == rid[:, None], tl.exp(L - rowmax[:, None]), 0.0), axis=1)
            mass = mine / full
        scan = masked
        for k in tl.static_range(K):
            best = tl.max(scan, axis=1)
            pick = tl.min(tl.where(scan == best[:, None], e[None, :], BE), axis=1)
            scan = tl.where(e[None, :] == pick[:, None], float("-inf"), scan)
            weight = tl.exp(best - first) / denom * mass
            rid = tl.load(ids_ptr + t * K + k, mask=tm, other=0)
            rw = tl.load(w_ptr + t * K + k, mask=tm, other=0.0)
            out_id = tl.where(keep, rid, pick.to(tl.int64))
            out_w = tl.where(keep, rw.to(tl.float32), weight)
            tl.store(out_ids_ptr + t * K + k, out_id, mask=tm)
            tl.store(out_w_ptr + t * K + k, out_w.to(out_w_ptr.dtype.element_ty), mask=tm)


def affinity_binning(logits: torch.Tensor, router_ids: torch.Tensor, router_weights: torch.Tensor,
                     real: torch.Tensor, exact: torch.Tensor, slot_table: torch.Tensor | None, alpha: float,
                     beta: int, scale: int, bonus: int, normalize: bool,
                     rows_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, K] int64, weights [T, K] in the router's weight dtype): lynx.py's rule in one launch.
    scale and bonus: lynx.py's (T + w) * T ** beta and w * T ** beta.
    rows_per_program: None, one program for the whole step; n, the rule spread over programs of n rows each in
    two launches and a zeroed [E] buffer (each program sums the popularity over all rows itself; the kept set
    is OR-ed across programs by atomics, so the ids are the same whatever n)."""
    T, E = logits.shape
    K = router_ids.shape[1]
    if T > MAX_ROWS or E > MAX_EXPERTS:
        raise ValueError(f"the LYNX kernel takes at most {MAX_ROWS} rows and {MAX_EXPERTS} experts, got {T} x {E}")
    ids = torch.empty(T, K, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, K, dtype=router_weights.dtype, device=logits.device)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    BT = max(16, triton.next_power_of_2(T))
    BE = max(16, triton.next_power_of_2(E))
    slots = slot_table if slot_table is not None else real  # not read when HAS_SLOTS is off
    if rows_per_program:
        RB = rows_per_program
        has_slots = slot_table is not None and bonus > 0
        kept = torch.zeros(E, dtype=torch.int32, device=logits.device)
        grid = (triton.cdiv(T, RB),)
        _lynx_propose[grid](logits, router_ids.contiguous(), real, exact, slots, kept, T, E, logits.stride(0),
                            float(alpha), scale, bonus, K=K, BETA=beta, RB=RB, CH=16, BE=BE, HAS_SLOTS=has_slots,
                            num_warps=2)
        _lynx_apply[grid](logits, router_ids.contiguous(), router_weights.contiguous(), real, exact, kept, ids,
                          weights, T, E, logits.stride(0), K=K, RB=RB, BT=BT, BE=BE, NORMALIZE=normalize,
                          num_warps=2)
        return ids, weights
    _affinity_binning[(1,)](logits, router_ids.contiguous(), router_weights.contiguous(), real, exact, slots, ids,
                            weights, T, E, logits.stride(0), float(alpha), scale, bonus, K=K, BETA=beta, BT=BT,
                            BE=BE, HAS_SLOTS=slot_table is not None and bonus > 0, NORMALIZE=normalize,
                            num_warps=8 if BT * BE >= 4096 else 4)
    return ids, weights
