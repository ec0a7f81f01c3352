"""The LYNX binning kernel's time per call on a GPU: one program for the whole step against the rows spread over
programs (routing/_lynx_triton.affinity_binning(rows_per_program=n)), on random router logits of E experts,
top-K, at each batch size and beta; each timed as a CUDA graph of 50 calls (the median of 20 replays, per call).

    python tools/lynx_binning_time.py [--batch-sizes 32,64,128] [--experts 64] [--top-k 8] [--beta 1,2]
        [--rows 0,1,2,4,8] [--out FILE.json]

One JSON line per cell on stdout (us per call, and whether the ids equal the one-program kernel's).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

CALLS = 50  # calls in one graph, so the graph's own launch is spread over them


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--beta", default="1,2")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--rows", default="0,1,2,4,8", help="rows per program; 0: one program for the step")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("tools/lynx_binning_time.py times a CUDA kernel and needs a CUDA device", file=sys.stderr)
        return 2
    from moeflow.experts.kernels.bench_kernels import time_graph
    from moeflow.routing import _lynx_triton

    torch.manual_seed(0)
    E, K = args.experts, args.top_k
    cells = []
    for T in (int(b) for b in args.batch_sizes.split(",")):
        logits = torch.randn(T, E, device="cuda").bfloat16()
        weights, ids = torch.softmax(logits.float(), -1).topk(K, -1)
        weights = weights.bfloat16()
        real = torch.ones(T, dtype=torch.bool, device="cuda")
        exact = torch.zeros_like(real)
        for beta in (int(b) for b in args.beta.split(",")):
            scale = T * T ** beta
            reference = None
            for rows in (int(r) for r in args.rows.split(",")):
                call = lambda: _lynx_triton.affinity_binning(  # noqa: E731
                    logits, ids, weights, real, exact, None, args.alpha, beta, scale, 0, True,
                    rows_per_program=rows or None)
                out = call()  # compiled before the capture
                torch.cuda.synchronize()
                reference = out if reference is None else reference
                us = time_graph(lambda: [call() for _ in range(CALLS)], [()], reps=20)  # None: not capturable
                cell = {"batch": T, "experts": E, "top_k": K, "beta": beta, "rows_per_program": rows or None,
                        "us_per_call": None if us is None else round(us / CALLS, 2),
                        "same_ids": bool(torch.equal(out[0], reference[0]))}
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
