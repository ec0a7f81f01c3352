"""`moeflow inspect`: what a checkpoint holds, and what an expert budget buys."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled tiny model)")
    p.add_argument("--expert-budget", action="append", default=[],
                   help="a budget to evaluate ('25%%', '8GiB', '2/layer'); repeatable")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the experts would be held in (default: the checkpoint's)")


def main(args: argparse.Namespace) -> int:
    import torch

    from moeflow.assets import default_model_dir
    from moeflow.config import ExpertBudget, format_bytes
    from moeflow.weights.checkpoint import Checkpoint

    ckpt = Checkpoint(args.model or default_model_dir())
    s = ckpt.spec
    dtype = ckpt.tensor_dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    expert = s.expert_bytes(size)
    total = s.all_expert_bytes(size)
    dense = ckpt.dense_numel() * size
    layouts = sorted({lay.kind for lay in ckpt.layouts.values()})
    rows = [
        ("architecture", f"{s.architecture} ({s.family})"),
        ("layers", f"{s.num_layers} ({s.num_moe_layers} MoE)"),
        ("hidden / heads / kv heads / head dim", f"{s.hidden_size} / {s.num_heads} / {s.num_kv_heads} / {s.head_dim}"),
        ("experts per layer / top-k", f"{s.num_experts} / {s.router.top_k}"
                                      + (f" + shared expert ({s.shared_expert_width} wide)" if s.shared_expert_width else "")),
        ("expert width", str(s.expert_width)),
        ("expert layout on disk", ", ".join(layouts)),
        ("dtype", str(dtype).removeprefix("torch.")),
        ("bytes per expert", format_bytes(expert)),
        ("all routed experts", format_bytes(total)),
        ("dense weights", format_bytes(dense)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    budgets = args.expert_budget or ["100%", "50%", "25%", "10%", "1/layer"]
    print(f"\n{'expert budget':<14} {'slots':>7} {'of experts':>11} {'device bytes':>14}")
    n_all = s.num_moe_layers * s.num_experts
    for text in budgets:
        slots = ExpertBudget.parse(text).num_slots(expert_bytes=expert, num_moe_layers=s.num_moe_layers,
                                                   num_experts=s.num_experts)
        note = "" if slots >= s.router.top_k else f"  too small: one layer needs {s.router.top_k} slots"
        print(f"{text:<14} {slots:>7} {slots / n_all:>11.1%} {format_bytes(slots * expert):>14}{note}")
    print(f"\nsmallest budget: {s.router.top_k} slots = {format_bytes(s.router.top_k * expert)} "
          "(the top-k experts of one token, needed together)")
    return 0
