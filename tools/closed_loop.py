"""Serving's closed loop on one engine, policy by policy: prefill steps, decode steps, expert bytes, waits.

    .venv/bin/python tools/closed_loop.py --data CORPUS [--model DIR] [--requests 256] [--in-flight 128]
        [--batch 32] [--budget 25%] [--policies fcfs,route-aware:admit=0,route-aware] [--device cpu]
        [--predictor auto|PRED_DIR]

`moeflow bench serve --max-concurrency C` keeps C requests in flight and sends the next as one finishes. This
drives an engine the same way (moeflow.bench.closed_loop), without a server, so which experts cross does not depend
on the machine: the bundled model on a CPU shows what a policy does to the bytes served on a GPU. The requests are
the text workload's (moeflow.bench.workload.TextWorkload: documents of --data's test split, the six domains in
turn, prompts of 64-256 tokens, temperature 0.8, top-p 0.95, a seed per request, 64 tokens, EOS ignored).

Each policy's run reports the prefill and decode steps, the steps a request waited between its sending and its
prefill (mean and most), its longest decode wait (RequestMetrics.max_decode_wait_steps), the expert bytes moved,
and whether every request's tokens equal the first policy's (they must: a request's sampling is seeded by its
own seed and step alone).

A policy is fcfs or route-aware[:wait=W][:admit=A] (--max-decode-wait W, --max-admit-wait A), each with
:predictor to run with --predictor (its predictive cache; route-aware then reads its forecasts), :rounds=N
with --expert-rounds N (the predictive cache's rounds by value) and :margin=X with --prefetch-margin X; or
window[:wait=W], grouping over more than one step (tools/schedule_replay.py's WindowPolicy, not an engine policy),
installed on a route-aware engine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from moeflow import LLM
from moeflow.assets import default_model_dir
from moeflow.bench.closed_loop import closed_loop
from moeflow.bench.workload import TextWorkload, load_documents
from moeflow.tokenizer import Tokenizer


def run(args, policy: str, requests) -> tuple[dict[str, list[int]], dict]:
    name, *options = policy.split(":")
    keys = {"wait": "max_decode_wait", "admit": "max_admit_wait", "rounds": "expert_rounds", "margin": "prefetch_margin"}
    engine_options = {keys[k]: float(v) if k == "margin" else int(v)
                      for k, v in (o.split("=") for o in options if o != "predictor")}
    if "predictor" in options:
        engine_options["predictor"] = args.predictor
    window = name == "window"
    llm = LLM(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto",
              max_model_len=max(len(r.prompt) for r in requests) + args.tokens + 1, max_num_seqs=args.in_flight,
              max_batch_size=args.batch, expert_budget=args.budget,
              scheduling="route-aware" if window else name, **engine_options)
    if window:
        from schedule_replay import WindowPolicy  # beside this script

        llm.engine.scheduler.policy = WindowPolicy(engine_options.get("max_decode_wait", 4))
    t0 = time.perf_counter()
    loop = closed_loop(llm.engine, requests, args.in_flight)
    waits = loop.admission_waits
    return {r: o.outputs[0].token_ids for r, o in loop.outputs.items()}, {
        "policy": policy, "prefill_steps": loop.prefill_steps, "decode_steps": llm.engine.counters["decode_steps"],
        "admission_wait_mean": round(float(np.mean(waits)), 2), "admission_wait_max": max(waits),
        "max_decode_wait": max(o.metrics.max_decode_wait_steps for o in loop.outputs.values()),
        "mib_moved": round(loop.bytes_moved / 2**20, 1), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--data", required=True, help="a corpus directory (its test split) or a jsonl of documents")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--in-flight", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="the most sequences one decode step takes")
    p.add_argument("--tokens", type=int, default=64, help="output tokens a request")
    p.add_argument("--budget", default="25%")
    p.add_argument("--policies", default="fcfs,route-aware:admit=0,route-aware")
    p.add_argument("--device", default="cpu")
    p.add_argument("--predictor", default="auto", help="for policies with :predictor (default: the model's own)")
    args = p.parse_args()
    workload = TextWorkload(load_documents(args.data), Tokenizer(args.model).encode, output_len=args.tokens)
    requests = workload.requests(0, args.requests)
    first = None
    for policy in args.policies.split(","):
        tokens, stats = run(args, policy, requests)
        first = first or tokens
        stats["tokens_as_first"] = all(tokens[k] == first[k] for k in first)
        print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
