"""Time the expert-compute backends on one GPU and report the weight bandwidth they reach.

    python -m moeflow.experts.kernels.bench_kernels [--dtype bf16] [--backends 'triton;grouped;reference']

T tokens, K top-k, H hidden, I expert width, S slots. Each backend is timed with CUDA events, median of many
calls, rotating over several input sets (different routings over one pool much larger than L2, so weights are
read from HBM as in a real step): eagerly (launch overhead included) and replayed from a CUDA graph (the
device time alone; "-" where the backend cannot be captured). Bytes = the weights of the distinct slots a call
reads (3*I*H each) + x read + out written; GB/s is set beside the 3.0 TB/s device-to-device copy ceiling of
an H100. Memory-bound efficiency matters for decode (T <= 64); prefill (T=2048) is compute-bound, so its
bandwidth column says little and TFLOP/s is printed instead.
"""

import argparse
import statistics
from dataclasses import dataclass

import torch

from moeflow.experts.kernels import fused_moe

PEAK_GBPS = 3000.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, slots=True)
class Shape:
    T: int
    K: int = 8
    H: int = 2048
    I: int = 768
    S: int = 128


DEFAULT_SHAPES = (Shape(1), Shape(8), Shape(32), Shape(64), Shape(2048))


def _inputs(shape: Shape, pool: torch.Tensor, n_sets: int, gen: torch.Generator):
    T, K, H, I, S = shape.T, shape.K, shape.H, shape.I, shape.S
    w_gate_up = pool[:, : 2 * I * H].view(S, 2 * I, H)
    w_down = pool[:, 2 * I * H :].view(S, H, I)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, H, generator=gen, device=pool.device).to(pool.dtype)
        ids = torch.rand(T, S, generator=gen, device=pool.device).topk(K, dim=1).indices
        w = torch.softmax(torch.randn(T, K, generator=gen, device=pool.device), dim=1)
        sets.append((x, ids, w, w_gate_up, w_down))
    return sets


def _bytes(shape: Shape, sets, elt: int) -> float:
    """Mean over the sets of the bytes one call must move at least."""
    per_set = []
    for x, ids, *_ in sets:
        slots = torch.unique(ids).numel()
        per_set.append(slots * 3 * shape.I * shape.H * elt + 2 * shape.T * shape.H * elt)
    return statistics.mean(per_set)


def _time_eager(fn, sets, reps: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        args = sets[i % len(sets)]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def time_graph(fn, sets, reps: int) -> float | None:
    """Median microseconds of fn(*args) replayed as a CUDA graph, one graph per input set (None: not capturable).
    fn must have run once eagerly (compiled) before."""
    graphs = []
    try:
        for args in sets:  # one graph per input set: each holds its own static inputs
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*args)
            graphs.append(g)
    except RuntimeError:  # not capturable (a host sync inside), or capture unsupported here
        torch.cuda.synchronize()
        return None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graphs[i % len(graphs)].replay()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def _backend_fn(backend: str):
    """"triton", "grouped", "reference", or "triton@BM,N1,K1,W1,S1,N2,K2,W2,S2" for a fixed TileConfig."""
    if backend.startswith("triton@"):
        from moeflow.experts.kernels.triton_moe import TileConfig, moe_triton

        cfg = TileConfig(*(int(v) for v in backend.split("@", 1)[1].split(",")))
        return lambda *args: moe_triton(*args, config=cfg)
    return lambda *args: fused_moe(*args, backend=backend)


def bench(shapes=DEFAULT_SHAPES, backends=("triton", "grouped"), dtype=torch.bfloat16, *,
          n_sets: int = 6, warmup: int = 5, reps: int = 60, seed: int = 0, device: str = "cuda") -> list[dict]:
    """One row per (shape, backend): times in microseconds, GB/s and % of the 3.0 TB/s ceiling, TFLOP/s."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_kernels needs a CUDA device")
    gen = torch.Generator(device=device).manual_seed(seed)
    elt = torch.empty((), dtype=dtype).element_size()
    results = []
    for shape in shapes:
        pool = torch.empty(shape.S, 3 * shape.I * shape.H, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
        sets = _inputs(shape, pool, n_sets, gen)
        nbytes = _bytes(shape, sets, elt)
        flops = 2 * 3 * shape.I * shape.H * shape.T * shape.K
        for backend in backends:
            fn = _backend_fn(backend)

            row = {"T": shape.T, "K": shape.K, "H": shape.H, "I": shape.I, "S": shape.S,
                   "dtype": str(dtype).removeprefix("torch."), "backend": backend, "MB": nbytes / 1e6}
            try:
                for i in range(warmup):
                    fn(*sets[i % n_sets])
                torch.cuda.synchronize()
            except (RuntimeError, ValueError) as exc:  # e.g. grouped on a dtype or shape _grouped_mm refuses
                row["error"] = f"{type(exc).__name__}: {exc}"[:120]
                results.append(row)
                continue
            reps_b = reps if backend != "reference" else max(6, reps // 10)
            eager_us = _time_eager(fn, sets, reps_b)
            # grouped off bfloat16 copies offsets to the host: capturing it would fail (and poison the stream)
            capturable = backend.startswith("triton") or (backend == "grouped" and dtype == torch.bfloat16)
            graph_us = time_graph(fn, sets, reps_b) if capturable else None
            best = min(t for t in (eager_us, graph_us) if t is not None)
            row.update(eager_us=eager_us, graph_us=graph_us, GBps=nbytes / best / 1e3,
                       pct_peak=100 * nbytes / best / 1e3 / PEAK_GBPS, TFLOPs=flops / best / 1e6)
            results.append(row)
        del pool, sets
        torch.cuda.empty_cache()
    return results


def format_table(rows: list[dict]) -> str:
    head = f"{'T':>5} {'K':>2} {'H':>5} {'I':>5} {'S':>4} {'dtype':>8} {'backend':>9} {'MB':>7} " \
           f"{'eager us':>9} {'graph us':>9} {'GB/s':>7} {'%3TB/s':>7} {'TFLOP/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['T']:>5} {r['K']:>2} {r['H']:>5} {r['I']:>5} {r['S']:>4} {r['dtype']:>8} {r['backend']:>9} " \
               f"{r['MB']:>7.1f} "
        if "error" in r:
            lines.append(left + r["error"])
            continue
        graph = f"{r['graph_us']:>9.1f}" if r["graph_us"] is not None else f"{'-':>9}"
        lines.append(left + f"{r['eager_us']:>9.1f} {graph} {r['GBps']:>7.0f} {r['pct_peak']:>6.1f}% "
                            f"{r['TFLOPs']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backends", default="triton,grouped",
                   help="';'-separated: triton, grouped, reference, or triton@BM,N1,K1,W1,S1,N2,K2,W2,S2 "
                        "(a fixed tile config, e.g. 'triton;triton@16,16,128,4,4,32,128,4,4')")
    p.add_argument("--T", default="1,8,32,64,2048", help="comma list of token counts")
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--H", type=int, default=2048)
    p.add_argument("--I", type=int, default=768)
    p.add_argument("--S", type=int, default=128)
    p.add_argument("--reps", type=int, default=60)
    a = p.parse_args(argv)
    shapes = [Shape(int(t), a.K, a.H, a.I, a.S) for t in a.T.split(",")]
    rows = bench(shapes, tuple(a.backends.split(";")), DTYPES[a.dtype], reps=a.reps)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
