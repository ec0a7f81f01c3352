"""The fused MoE kernel's row tiles under LYNX's concentration, at the bench model's expert shape: tiles read and
time, exact routing against LYNX, with the engine's 16-row tiles and with 32-row ones.

    PYTHONPATH=. python3 tools/moe_tile_time.py [--batch-sizes 32,64] [--skews 0,0.5,1] [--alpha 3 --beta 1]
        [--block-m 16,32] [--routings 8] [--out FILE.json]

Why: on 2026-12-06 (H200, the trained bench model) LYNX at (3, 1) ran 43 experts a layer-step at batch 64 against
exact routing's 64, and its resident step was no faster. The fused kernel gives each expert ceil(pairs / BM) tiles
of BM rows, and every tile reads its expert's weights. LYNX moves picks onto popular experts; one that gets more
than BM pairs is read twice or more, so the weights read can shrink less than the experts run.

Routing (random, not a trained model's): router logits for T tokens over E = 64 experts, each expert's logit its
log-popularity times `skew` (popularity 1 / (rank + 1), a Zipf law over the experts) plus standard Gumbel noise
per token. Exact: each token's top 8. LYNX: AffinityBinning's rule at (alpha, beta) on the same logits (its
torch path, the ids its kernel gives too). For each batch size, skew and routing, averaged over `--routings`
draws: distinct experts, the most pairs on one expert, and the tiles of BM rows (the sum over experts of
ceil(pairs / BM)) for each BM. On CUDA, each (routing, BM) is also timed: the fused MoE call replayed as a CUDA
graph (median of 50 replays of 20 calls), bfloat16, over a resident pool of 12 layers x 64 experts of 2048 x 768
(the bench model's), a layer's slice read per call (the pool is larger than L2). BM = 16 is the engine's tile
config (pick_config over the pool, as CachedExperts asks for it); other BMs keep its N and K blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

E, K, H, I, LAYERS = 64, 8, 2048, 768, 12


def draw_logits(T: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """[T, E] float32: skew * log(1 / (rank + 1)) for a random order of the experts, plus Gumbel noise per token."""
    order = torch.randperm(E, generator=gen)
    base = -skew * torch.log(torch.arange(1, E + 1, dtype=torch.float32))[order]
    u = torch.rand(T, E, generator=gen).clamp_(1e-9, 1 - 1e-9)
    return base - torch.log(-torch.log(u))


def routings(T: int, skew: float, alpha: float, beta: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """{"exact": ids [T, K], "lynx": ids [T, K]} for one draw of logits."""
    from moeflow.architectures.spec import RouterSpec
    from moeflow.routing.lynx import AffinityBinning
    from moeflow.routing.router import Routing
    from moeflow.routing.selection import SelectionContext

    logits = draw_logits(T, skew, gen)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = probs.topk(K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    selector = AffinityBinning(alpha, beta, RouterSpec(K, True, False), kernel="torch")
    ctx = SelectionContext(False, torch.ones(T, dtype=torch.bool), torch.zeros(T, dtype=torch.bool))
    lynx = selector.select(0, Routing(ids, weights, logits), ctx)
    return {"exact": ids, "lynx": lynx.ids}


def tile_counts(ids: torch.Tensor, block_ms: list[int]) -> dict:
    pairs = torch.bincount(ids.flatten(), minlength=E)
    used = pairs[pairs > 0]
    return {"experts": int(used.numel()), "max_pairs": int(used.max()),
            **{f"tiles_bm{bm}": int(sum(math.ceil(int(n) / bm) for n in used)) for bm in block_ms}}


def time_call(ids_sets: list[torch.Tensor], block_m: int, pool: torch.Tensor, T: int) -> float:
    """Microseconds a fused MoE call, median over replays of a graph that runs the sets in turn on layer slices."""
    from moeflow.experts.kernels.triton_moe import moe_triton, pick_config, with_block_m

    dev, dtype = pool.device, pool.dtype
    cfg = pick_config(T * K, LAYERS * E, H, I, dtype)
    if block_m != cfg.block_m:
        cfg = with_block_m(cfg, block_m, dtype)
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w = torch.full((T, K), 1.0 / K, device=dev)
    calls = []
    for n in range(20):  # 20 calls a replay: layer slices in turn, the routing sets in turn
        layer = pool[(n % LAYERS) * E : (n % LAYERS + 1) * E]
        gate_up, down = layer[:, : 2 * I * H].view(E, 2 * I, H), layer[:, 2 * I * H :].view(E, H, I)
        calls.append((ids_sets[n % len(ids_sets)].to(dev), gate_up, down))

    def run() -> None:
        for ids, gate_up, down in calls:
            moe_triton(x, ids, w, gate_up, down, config=cfg)

    run()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="32,64")
    p.add_argument("--skews", default="0,0.5,1")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--beta", type=int, default=1)
    p.add_argument("--block-m", default="16,32")
    p.add_argument("--routings", type=int, default=8, help="logit draws per cell")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    block_ms = [int(b) for b in args.block_m.split(",")]
    cuda = torch.cuda.is_available()
    pool = None
    if cuda:
        pool = torch.randn(LAYERS * E, 3 * I * H, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = []
    for T in (int(b) for b in args.batch_sizes.split(",")):
        for skew in (float(s) for s in args.skews.split(",")):
            gen = torch.Generator().manual_seed(T * 1000 + int(skew * 100))
            draws = [routings(T, skew, args.alpha, args.beta, gen) for _ in range(args.routings)]
            for name in ("exact", "lynx"):
                counts = [tile_counts(d[name], block_ms) for d in draws]
                row = {"batch": T, "skew": skew, "routing": name,
                       **{k: round(statistics.mean(c[k] for c in counts), 2) for k in counts[0]}}
                if cuda:
                    for bm in block_ms:
                        row[f"us_bm{bm}"] = round(time_call([d[name] for d in draws], bm, pool, T), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if cuda else "cpu"
        args.out.write_text(json.dumps({"device": device, "alpha": args.alpha, "beta": args.beta, "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
