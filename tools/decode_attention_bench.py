"""Decode attention on one GPU: the Triton kernels of moeflow.models.decode_attention against the torch path
moeflow uses today.

    python tools/decode_attention_bench.py [--shapes bench,qwen3] [--batches 1,8,32,64] [--contexts 128,1024,4000]
                                           [--splits auto|S]

B sequences, N query heads, G KV heads, D head dim, M max_model_len, C the context bucket, L cache layers.
Today (MoEModel._attention -> attend_decode): gather the batch's cache rows sliced to the bucket C (256, 512, ...,
M: context_buckets) and run SDPA with a boolean mask. New: decode_attention reads each sequence's row and
length from device tensors and only the keys it attends to. Every sequence of a batch has the given context.

Timings are medians of triton.testing.do_bench (which flushes the L2 before each timed call). "graph": a CUDA
graph of one call on each of L layers' caches, so each call reads its keys from HBM as in a real step, per
call; "eager": one call launched from Python, what a step outside graphs pays. S = key splits of the Triton
kernel. GB/s = keys and values the sequences attend to, read once, over the triton graph time. err = worst
relative error of a sequence's output against the float32 reference (decode_attention_reference).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from moeflow.engine.cuda_graphs import bucket, context_buckets
from moeflow.markdown import table
from moeflow.models.decode_attention import decode_attention_reference, num_splits
from moeflow.models.decode_attention_triton import decode_attention_triton
from moeflow.models.layers import attend_decode

# name -> (N, G, D): the bench reference model's attention, and Qwen3-30B-A3B's
SHAPES = {"bench": (16, 4, 128), "qwen3": (32, 4, 128)}


def torch_today(q, k_cache, v_cache, rows, lens, C: int, scale: float):
    return attend_decode(q, k_cache[rows, :, :C], v_cache[rows, :, :C], lens, scale, None)


def graph_of(calls) -> torch.cuda.CUDAGraph:
    """A graph replaying every call of `calls` once (each warmed up eagerly first, on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return graph


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref.float()).norm(dim=1)
    return float((diff / ref.float().norm(dim=1)).max())


def bench_shape(name: str, N: int, G: int, D: int, M: int, batches, contexts, layers: int, dtype,
                splits: int | None) -> list[list]:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    R = max(batches)
    shape = (layers, R, G, M, D)
    k_all = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_all = torch.randn(shape, generator=gen, device=device).to(dtype)
    scale = D**-0.5
    out_rows = []
    for B in batches:
        q = torch.randn(B, N, D, generator=gen, device=device).to(dtype)
        rows = torch.randperm(R, generator=gen, device=device)[:B]
        S = num_splits(B, G, M) if splits is None else splits
        for ctx in contexts:
            ctx = min(ctx, M)
            lens = torch.full((B,), ctx, dtype=torch.int64, device=device)
            C = bucket(ctx, context_buckets(M))
            new = [lambda l=l: decode_attention_triton(q, k_all[l], v_all[l], rows, lens, scale, None, splits=S)
                   for l in range(layers)]
            old = [lambda l=l: torch_today(q, k_all[l], v_all[l], rows, lens, C, scale) for l in range(layers)]
            err = row_rel_err(new[0](), decode_attention_reference(q, k_all[0], v_all[0], rows, lens, scale, None))
            err_old = row_rel_err(old[0](), decode_attention_reference(q, k_all[0], v_all[0], rows, lens, scale, None))
            g_new, g_old = graph_of(new), graph_of(old)
            t_new = triton.testing.do_bench(g_new.replay, return_mode="median") * 1e3 / layers
            t_old = triton.testing.do_bench(g_old.replay, return_mode="median") * 1e3 / layers
            e_new = triton.testing.do_bench(new[0], return_mode="median") * 1e3
            e_old = triton.testing.do_bench(old[0], return_mode="median") * 1e3
            del g_new, g_old
            gbps = 2 * B * G * ctx * D * k_all.element_size() / (t_new * 1e-6) / 1e9
            out_rows.append([name, B, ctx, C, S, f"{t_old:.1f}", f"{t_new:.1f}",
                             f"{t_old / t_new:.2f}x", f"{e_old:.1f}", f"{e_new:.1f}", f"{gbps:.0f}",
                             f"{err_old:.1e}", f"{err:.1e}"])
            print(" | ".join(map(str, out_rows[-1])), flush=True)
    return out_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="bench,qwen3", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default="128,1024,4000")
    p.add_argument("--max-len", type=int, default=4096, help="M, the cache's max_model_len")
    p.add_argument("--layers", type=int, default=8, help="L: caches the graph cycles through")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--splits", default="auto", help="S for every cell: auto (num_splits) or a number")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    for name in args.shapes.split(","):
        N, G, D = SHAPES[name]
        rows += bench_shape(name, N, G, D, args.max_len, batches, contexts, args.layers, dtype,
                            None if args.splits == "auto" else int(args.splits))
        torch.cuda.empty_cache()
    header = ["shape", "B", "context", "C", "S", "torch graph µs", "triton graph µs", "speed-up",
              "torch eager µs", "triton eager µs", "triton GB/s", "torch err", "triton err"]
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, M={args.max_len}, L={args.layers}; "
          f"shapes {', '.join(f'{n}: N,G,D={SHAPES[n]}' for n in args.shapes.split(','))}\n")
    print(table(header, rows, right_from=1))


if __name__ == "__main__":
    main()
