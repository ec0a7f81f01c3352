"""Host time the predictive expert cache spends planning, per decode step, replayed on the CPU.

    .venv/bin/python tools/planner_host_time.py TRACE.npz [--model DIR] [--predictor PRED_DIR]
        [--budgets 10%,25%] [--batches 1,8] [--tokens 4000] [--repeat 3] [--digest] [--profile N] [--json]

Replays the trace's decode steps through the real ExpertCache, ExpertFlowPlanner and predictor
(experts/replay.py, as `moeflow predictor eval` does) and clocks, with time.perf_counter, the calls the
engine makes on the host around each step:

    planner   plan() before the step and refine() after each MoE layer's router, with every cache call
              they make (set_quotas, protect, prioritize, enqueue/drop/issue_prefetches, residency)
    cache     the demand path the MoE layers drive: acquire, release, collect_stats
    predictor predict, refine, observe (what the planner reads; not the planner's own cost)

Each figure is the fastest of `--repeat` replays (a shared machine only ever adds time), in microseconds per
step and per token; with the replay's hit rate and bytes moved per token, which a change that only speeds the
planner up must leave as they are. `--digest` replays once more and hashes the cache's whole state (slot map,
slot states, quotas, protection, priorities, the prefetch queue in issue order, the LRU clock, the counters)
after every planner and cache call: equal digests mean the same experts loaded, evicted, prefetched and
protected, in the same order. `--profile N` prints cProfile's N costliest functions of one replay per
configuration.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import time
from collections.abc import Callable

import numpy as np
import torch

from moeflow.assets import default_model_dir
from moeflow.experts.cache import ExpertCache
from moeflow.experts.predictive import ExpertFlowPlanner
from moeflow.experts.replay import ReplayStep, decode_steps, make_cache, pool_at, replay
from moeflow.experts.stats import LayerStats
from moeflow.routing.predictors.learned import load_predictor
from moeflow.routing.predictors.net import find_predictor
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint

PLANNER_CALLS = ("plan", "refine")
CACHE_CALLS = ("acquire", "release", "collect_stats")
PREDICTOR_CALLS = ("predict", "refine", "observe")


def wrap(obj, names: tuple[str, ...], after: Callable[[], None]) -> None:
    """Call `after` once each of obj's methods `names` returns (on this object only, its class untouched)."""
    for name in names:
        method = getattr(obj, name)

        def called(*args, _method=method, **kwargs):
            out = _method(*args, **kwargs)
            after()
            return out

        setattr(obj, name, called)


def clock(obj, names: tuple[str, ...], spent: dict[str, float], key: str) -> None:
    """Add the seconds each of obj's methods `names` takes to spent[key]."""
    for name in names:
        method = getattr(obj, name)

        def timed(*args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0

        setattr(obj, name, timed)


def state_digest(cache: ExpertCache, h) -> Callable[[], None]:
    """A function that folds the cache's state, as its decisions leave it, into the hash `h`."""

    def fold() -> None:
        t = cache.transfer
        queued = sorted((d, s, tk, slot) for d, s, tk, slot in t._order
                        if slot in t._queued and t._queued[slot][0] == tk)
        h.update(cache.slot_of.tobytes())
        h.update(cache._state.tobytes())
        h.update(cache._pins.tobytes())
        h.update(cache.order.quota.tobytes())
        h.update(np.asarray(cache.order.protected, dtype=bool).tobytes())
        h.update(b"-" if cache.order.priority is None else np.asarray(cache.order.priority, dtype=np.float64).tobytes())
        h.update(repr([(d, s, slot) for d, s, _, slot in queued]).encode())
        h.update(cache.policy._last.tobytes())
        total = cache.stats.total()
        h.update(repr([getattr(total, f) for f in LayerStats.__dataclass_fields__ if f != "stall_s"]).encode())

    return fold


def one_replay(steps: list[ReplayStep], spec, slots: int, eb: int, pred_dir, ck, *, timed: bool = True,
               digest: bool = False, profile: cProfile.Profile | None = None) -> dict:
    cache = make_cache(spec, slots, eb)
    predictor = load_predictor(pred_dir, ck)
    planner = ExpertFlowPlanner()
    spent = {"planner": 0.0, "cache": 0.0, "predictor": 0.0}
    h = hashlib.sha256()
    if digest:
        fold = state_digest(cache, h)
        wrap(planner, PLANNER_CALLS, fold)
        wrap(cache, CACHE_CALLS, fold)
    if timed:
        clock(planner, PLANNER_CALLS, spent, "planner")
        clock(cache, CACHE_CALLS, spent, "cache")
        clock(predictor, PREDICTOR_CALLS, spent, "predictor")
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    r = replay(steps, cache, predictor, planner)
    if profile is not None:
        profile.disable()
    spent["replay"] = time.perf_counter() - t0
    return {"spent": spent, "hit_rate": r.hit_rate, "bytes_per_token": r.bytes_per_token, "tokens": r.tokens,
            "stats": {f: getattr(r.stats, f) for f in LayerStats.__dataclass_fields__ if f != "stall_s"},
            "digest": h.hexdigest() if digest else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--model", default=None)
    p.add_argument("--predictor", default=None, help="default: the one inside or beside the model directory")
    p.add_argument("--budgets", default="10%,25%")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=4000, help="trace tokens replayed (whole sequences)")
    p.add_argument("--repeat", type=int, default=3, help="replays per configuration; the fastest is reported")
    p.add_argument("--digest", action="store_true", help="hash the cache's state after every call (one more replay)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's N costliest functions")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = args.model or default_model_dir()
    ck = Checkpoint(model)
    spec = ck.spec
    L, E, K = spec.num_moe_layers, spec.num_experts, spec.router.top_k
    pred_dir = args.predictor or find_predictor(model)
    data = RouteData.from_traces([Trace.load(args.trace)])
    slices = data.first_sequences(args.tokens)
    n = sum(s.stop - s.start for s in slices)
    rows = []
    for budget in args.budgets.split(","):
        slots, eb = pool_at(ck, budget)  # as `moeflow predictor eval` sizes the pool
        for B in map(int, args.batches.split(",")):
            steps = decode_steps(data.token_ids, data.routes, slices, B, E)
            runs = [one_replay(steps, spec, slots, eb, pred_dir, ck) for _ in range(max(1, args.repeat))]
            best = {k: min(r["spent"][k] for r in runs) for k in runs[0]["spent"]}
            first = runs[0]
            if any((r["stats"], r["bytes_per_token"]) != (first["stats"], first["bytes_per_token"]) for r in runs):
                raise RuntimeError("replays of one configuration disagree: the predictor is not deterministic")
            row = {"budget": budget, "batch": B, "slots": slots, "steps": len(steps), "tokens": first["tokens"],
                   "hit_rate": first["hit_rate"], "bytes_per_token": first["bytes_per_token"],
                   "stats": first["stats"],
                   "us_per_step": {k: 1e6 * v / len(steps) for k, v in best.items()},
                   "us_per_token": {k: 1e6 * v / first["tokens"] for k, v in best.items()}}
            if args.digest:
                row["digest"] = one_replay(steps, spec, slots, eb, pred_dir, ck, timed=False, digest=True)["digest"]
            if args.profile:
                prof = cProfile.Profile()
                one_replay(steps, spec, slots, eb, pred_dir, ck, timed=False, profile=prof)
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
                row["profile"] = out.getvalue()
            rows.append(row)
            if not args.json:
                print(f"  {budget} batch {B}: {len(steps)} steps, planner+cache "
                      f"{row['us_per_step']['planner'] + row['us_per_step']['cache']:.0f} us/step", flush=True)
    if args.json:
        print(json.dumps({"trace": args.trace, "predictor": str(pred_dir), "trace_tokens": n, "layers": L,
                          "experts": E, "top_k": K, "expert_bytes": eb, "rows": rows}, indent=1))
        return
    print(f"\n{n} trace tokens, {L} layers x {E} experts, top-{K}; host microseconds per token "
          f"(per step), the fastest of {args.repeat} replays")
    head = ("budget", "batch", "slots", "planner", "cache", "planner+cache", "predictor", "replay", "hit rate",
            "KiB/token")
    print(" | ".join(head))
    for r in rows:
        t, s = r["us_per_token"], r["us_per_step"]
        cells = [r["budget"], str(r["batch"]), str(r["slots"])]
        for k in ("planner", "cache"):
            cells.append(f"{t[k]:.0f} ({s[k]:.0f})")
        cells.append(f"{t['planner'] + t['cache']:.0f} ({s['planner'] + s['cache']:.0f})")
        for k in ("predictor", "replay"):
            cells.append(f"{t[k]:.0f} ({s[k]:.0f})")
        cells += [f"{r['hit_rate']:.4f}", f"{r['bytes_per_token'] / 1024:.1f}"]
        print(" | ".join(cells))
    for r in rows:
        if "digest" in r:
            print(f"digest {r['budget']} batch {r['batch']}: {r['digest']}")
        if "profile" in r:
            print(f"\n-- profile {r['budget']} batch {r['batch']}\n{r['profile']}")


if __name__ == "__main__":
    main()
