"""What a prompt of a length not seen before costs in attention, per SDPA backend (GPU only).

    python tools/prefill_probe.py [--out results.json]

1. Raw scaled_dot_product_attention at the bench model's shapes (16 query heads, 4 KV heads, head dim 128,
   bfloat16): for each backend set, the first call at each of 24 new lengths against a repeat call at the
   same length. A backend that plans per shape (cuDNN) shows it as a first/repeat ratio far above 1.
2. The same at decode shapes (one query per sequence, a mask, batch 32), where CUDA graphs fix the shapes
   but an eager engine sees a new context length every step.
3. moeflow end to end on the bundled model (100% budget): one-token requests at new prompt lengths, then the
   same lengths again, with moeflow's prefill backends and with every backend torch has (its default order).
4. Eager decode (as with a route observer or an approximate selector) on the bundled model, batch 8, 128
   tokens from prompts of a length not used before: contexts padded to moeflow's buckets against one context
   length per step; CUDA-graph decode beside them for reference.

Every measurement set uses lengths no earlier one used, so no set profits from plans another one built.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ALL = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SETS = {
    "torch default (all backends)": ALL,
    "cudnn only": [SDPBackend.CUDNN_ATTENTION],
    "flash only": [SDPBackend.FLASH_ATTENTION],
    "efficient only": [SDPBackend.EFFICIENT_ATTENTION],
    "moeflow prefill (flash, efficient, math)": None,  # filled from moeflow.models.layers
}


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def first_and_repeat(calls) -> dict:
    """Each call timed once, then at its best of three more; the medians of both."""
    first, again = [], []
    for call in calls:
        first.append(timed(call))
        again.append(min(timed(call) for _ in range(3)))
    return summary(first, again)


def raw_prefill(backends, lengths) -> dict:
    def call_at(n):
        q = torch.randn(1, 16, n, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(1, 4, n, 128, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)

        def call():
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return call
    return first_and_repeat(call_at(n) for n in lengths)


def raw_decode(backends, contexts) -> dict:
    def call_at(c):
        q = torch.randn(32, 16, 1, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(32, 4, c, 128, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        mask = torch.ones(32, 1, 1, c, dtype=torch.bool, device="cuda")

        def call():
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return call
    return first_and_repeat(call_at(c) for c in contexts)


def summary(first: list[float], again: list[float]) -> dict:
    f, a = statistics.median(first), statistics.median(again)
    return {"first_ms": round(f * 1e3, 3), "repeat_ms": round(a * 1e3, 3), "first_over_repeat": round(f / a, 1),
            "n": len(first)}


def engine(llm, backends, lengths) -> dict:
    from moeflow import SamplingParams
    from moeflow.models import model  # prefill attention reads the backend list from there

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    saved = model.PREFILL_SDPA_BACKENDS
    model.PREFILL_SDPA_BACKENDS = backends
    try:
        first = [timed(lambda n=n: llm.generate([[5] * n], params)) for n in lengths]
        again = [timed(lambda n=n: llm.generate([[5] * n], params)) for n in lengths]
    finally:
        model.PREFILL_SDPA_BACKENDS = saved
    return summary(first, again)


def eager_decode(warm_len: int, prompt_len: int, *, bucketed: bool, graphs: bool, device: str = "cuda") -> dict:
    from moeflow import LLM, SamplingParams
    from moeflow.engine import model_runner

    llm = LLM("moeflow/assets/moeflow-tiny", device=device, enforce_eager=not graphs)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    saved = model_runner.bucket
    if not bucketed:
        model_runner.bucket = lambda n, buckets: n
    try:
        llm.generate([[7] * warm_len] * 8, params)  # warm-up: kernels loaded (and graphs captured)
        stats = llm.generate([[9] * prompt_len] * 8, params).stats
    finally:
        model_runner.bucket = saved
    return {"decode_tokens_per_s": round(stats.decode_tokens_per_s, 1), "prompt_len": prompt_len}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from moeflow.models.layers import PREFILL_SDPA_BACKENDS

    SETS["moeflow prefill (flash, efficient, math)"] = PREFILL_SDPA_BACKENDS
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "raw_prefill": {}, "raw_decode": {}, "engine": {}}
    fresh = iter(range(17, 100_000, 7))  # lengths never used twice across the whole run
    raw_prefill(ALL, [16])  # CUDA context, cuBLAS and kernel loading out of the way
    for name, backends in SETS.items():
        for kind, fn, scale in (("raw_prefill", raw_prefill, 1), ("raw_decode", raw_decode, 8)):
            try:
                result[kind][name] = fn(backends, [next(fresh) * scale for _ in range(24)])
            except RuntimeError as exc:  # a backend that cannot serve the shape
                result[kind][name] = {"error": str(exc).splitlines()[0][:200]}
            print(kind, name, result[kind][name], flush=True)
    from moeflow import LLM

    llm = LLM("moeflow/assets/moeflow-tiny", device="cuda")
    engine(llm, PREFILL_SDPA_BACKENDS, [16])  # kernels loaded before anything is timed
    for name in ("torch default (all backends)", "moeflow prefill (flash, efficient, math)"):
        result["engine"][name] = engine(llm, SETS[name], [next(fresh) % 700 + 20 for _ in range(24)])
        print("engine", name, result["engine"][name], flush=True)
    result["eager_decode"] = {
        "eager, contexts padded to buckets (moeflow)": eager_decode(16, 300, bucketed=True, graphs=False),
        "eager, one context length per step": eager_decode(16, 450, bucketed=False, graphs=False),
        "CUDA graphs (same buckets warmed up)": eager_decode(600, 601, bucketed=True, graphs=True),
    }
    print("eager_decode", result["eager_decode"], flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
