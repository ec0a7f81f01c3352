"""`moeflow bench offline`: one process, one model, the same prompts, every configuration side by side.

moeflow at each expert budget (LRU, on demand), transformers' generate with the whole model
on the GPU, and transformers with accelerate offloading held to the GPU memory of a moeflow
budget. For every offloaded moeflow run the report gives its floor (bytes moved over the
measured pinned bandwidth plus the resident decode time) and the same for an optimal
(Belady) cache, and measured/floor.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
from pathlib import Path


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory")
    src.add_argument("--synthetic", help="a random-weight model of a real shape: qwen3-30b-a3b-8l or mixtral-8x7b")
    p.add_argument("--synthetic-dir", default=None,
                   help="write the synthetic model here first, so transformers baselines can load it")
    p.add_argument("--budgets", type=_csv(str), default=["100%", "50%", "25%", "10%"])
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--baselines", type=_csv(str), default=["transformers", "accelerate"],
                   help="comma list of: transformers, accelerate (or empty)")
    p.add_argument("--baseline-batch-sizes", type=_csv(int), default=None,
                   help="batch sizes for transformers (default: --batch-sizes)")
    p.add_argument("--accelerate-budget", default="25%", help="moeflow budget whose GPU memory accelerate is held to")
    p.add_argument("--accelerate-batch-sizes", type=_csv(int), default=[1, 16])
    p.add_argument("--accelerate-output-len", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for results.json, results.md and the plots")
    p.add_argument("--title", default=None)


def main(args: argparse.Namespace) -> int:
    import torch

    from moeflow.bench.floors import device_memory_bandwidth, expert_load_bandwidth, pinned_h2d_bandwidth
    from moeflow.bench.report import write_report
    from moeflow.bench.runs import random_prompts, run_moeflow
    from moeflow.config import EngineConfig
    from moeflow.engine.engine import LLMEngine
    from moeflow.errors import ConfigError
    from moeflow.weights.synthetic import SyntheticCheckpoint, write_checkpoint

    if not torch.cuda.is_available():
        raise ConfigError("moeflow bench offline measures GPU configurations and needs a CUDA device")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    checkpoint, model_dir = None, args.model
    if args.synthetic:
        checkpoint = SyntheticCheckpoint.preset(args.synthetic, seed=args.seed, dtype=dtype, device=device)
        if args.synthetic_dir:
            model_dir = str(write_checkpoint(checkpoint, Path(args.synthetic_dir)))
            os.sync()  # the checkpoint's dirty pages are written back now, not during the timed runs
    max_batch = max(args.batch_sizes)
    config = EngineConfig(model=model_dir or "<synthetic>", device="cuda", dtype=args.dtype,
                          max_model_len=args.prompt_len + args.output_len + 8, max_num_seqs=max_batch,
                          max_num_batched_tokens=max_batch * args.prompt_len)
    engine = LLMEngine(config, skip_tokenizer_init=True, checkpoint=checkpoint)
    spec = engine.spec
    engine.store.fill_all(progress=True)  # reading experts from disk is start-up, not a step's stall
    bandwidth = pinned_h2d_bandwidth(64 * engine.store.expert_bytes, device)
    memory_bandwidth = device_memory_bandwidth(device)
    # the copy engine against one plain pinned copy of the same bytes (one layer's experts)
    layer_bytes = spec.num_experts * engine.store.expert_bytes
    load_bandwidth = expert_load_bandwidth(engine)
    plain_bandwidth = pinned_h2d_bandwidth(layer_bytes, device)
    print(f"pinned host->device: {bandwidth / 1e9:.1f} GB/s; device memory: {memory_bandwidth / 1e12:.2f} TB/s; "
          f"expert loads: {load_bandwidth / 1e9:.1f} GB/s, {load_bandwidth / plain_bandwidth:.1%} of a plain pinned "
          f"copy of the same {layer_bytes / 1e6:.0f} MB")

    results = []
    # largest budget first: the resident run is every offloaded run's reference
    budgets = sorted(set(args.budgets), key=lambda b: -_budget_device_bytes(engine, b))
    for budget in budgets:
        for batch in args.batch_sizes:
            prompts = random_prompts(batch, args.prompt_len, spec.vocab_size, args.seed + batch)
            r = run_moeflow(engine, budget, prompts, args.output_len, eviction=args.eviction)
            results.append(r)
            print(f"moeflow {budget:>6} batch {batch:>3}: {r.decode_tokens_per_s:9.1f} tok/s, "
                  f"TTFT {r.ttft_s * 1e3:8.1f} ms, hit rate {r.hit_rate:6.1%}, peak {r.peak_device_bytes / 2**30:.2f} GiB",
                  flush=True)
    accelerate_gpu_bytes = _budget_device_bytes(engine, args.accelerate_budget)
    dense_bytes = engine.model.dense_bytes()
    embedding_bytes = engine.model.w["model.embed_tokens.weight"].numel() * engine.model.w["model.embed_tokens.weight"].element_size()
    expert_bytes = engine.store.expert_bytes
    del engine
    gc.collect()
    torch.cuda.empty_cache()

    if model_dir and "transformers" in args.baselines:
        results += _baseline(model_dir, dtype, "transformers", "all on GPU", args.baseline_batch_sizes or args.batch_sizes,
                             args, spec.vocab_size, device_map="cuda")
    if model_dir and "accelerate" in args.baselines:
        gib = accelerate_gpu_bytes / 2**30
        results += _baseline(model_dir, dtype, "transformers+accelerate", f"{gib:.2f} GiB GPU",
                             args.accelerate_batch_sizes, args, spec.vocab_size, device_map="auto",
                             max_memory={0: f"{gib:.2f}GiB", "cpu": "200GiB"}, output_len=args.accelerate_output_len)

    meta = {
        "title": args.title or f"moeflow bench offline: {args.synthetic or Path(args.model).name}",
        "date": datetime.date.today().isoformat(),
        "command": "moeflow bench offline " + " ".join(_argv(args)),
        "machine": f"{torch.cuda.get_device_name(device)}, {platform.machine()}, torch {torch.__version__}",
        "model": args.synthetic or args.model, "architecture": spec.architecture,
        "shape": {"layers": spec.num_layers, "experts": spec.num_experts, "top_k": spec.router.top_k,
                  "hidden": spec.hidden_size, "expert_width": spec.expert_width},
        "expert_bytes": expert_bytes, "dense_bytes": dense_bytes, "embedding_bytes": embedding_bytes,
        "pinned_h2d_bytes_per_s": bandwidth, "device_memory_bytes_per_s": memory_bandwidth, "dtype": args.dtype,
        "expert_load_bytes_per_s": load_bandwidth, "plain_copy_same_bytes_per_s": plain_bandwidth,
        "num_moe_layers": spec.num_moe_layers,
    }
    write_report(out, meta, results, args.accelerate_budget)
    return 0


def _budget_device_bytes(engine, budget: str) -> int:
    """GPU memory moeflow needs at `budget`: the expert pool plus the dense weights."""
    from moeflow.config import ExpertBudget

    spec = engine.spec
    slots = ExpertBudget.parse(budget).num_slots(expert_bytes=engine.store.expert_bytes,
                                                 num_moe_layers=spec.num_moe_layers, num_experts=spec.num_experts)
    return slots * engine.store.expert_bytes + engine.model.dense_bytes()


def _baseline(model_dir, dtype, system, budget, batch_sizes, args, vocab, output_len=None, **load_kwargs):
    import torch
    import transformers as tf

    from moeflow.bench.runs import random_prompts, run_transformers

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **load_kwargs).eval()
    out = []
    for batch in batch_sizes:
        prompts = random_prompts(batch, args.prompt_len, vocab, args.seed + batch)
        r = run_transformers(model, system, budget, prompts, output_len or args.output_len)
        out.append(r)
        print(f"{system} batch {batch:>3}: {r.decode_tokens_per_s:9.1f} tok/s, TTFT {r.ttft_s * 1e3:8.1f} ms, "
              f"peak {r.peak_device_bytes / 2**30:.2f} GiB", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def _argv(args: argparse.Namespace) -> list[str]:
    skip = {"command", "benchmark", "_main", "_bench_main"}
    parts = []
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [flag, ",".join(map(str, v))]
        else:
            parts += [flag, str(v)]
    return parts
