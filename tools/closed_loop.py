"""Serving's closed loop on one engine, policy by policy: prefill steps, decode steps, expert bytes, decode waits.

    .venv/bin/python tools/closed_loop.py --data test_sample.jsonl [--model DIR] [--requests 256] [--in-flight 128]
        [--batch 32] [--tokens 32] [--budget 25%] [--policies fcfs,route-aware:admit=0,route-aware] [--device cpu]
        [--predictor auto|PRED_DIR]

`moeflow bench serve --max-concurrency C` keeps C requests in flight and sends the next as one finishes. This
drives an engine the same way (moeflow.bench.closed_loop), without a server, so which experts cross does not depend
on the machine: the bundled model on a CPU shows what a policy does to the bytes served on a GPU. Every request decodes greedily for
exactly --tokens tokens from a prompt of 20-40 tokens of a document of --data (a jsonl of corpus documents, e.g.
`tools/corpus_sample.py CORPUS test 150`). Each policy's run reports the prefill and decode steps, the longest
decode wait of any request (RequestMetrics.max_decode_wait_steps), the expert bytes moved and whether every
request's tokens equal the first policy's.

A policy is fcfs or route-aware[:wait=W][:admit=A] (--max-decode-wait W, --max-admit-wait A), each with
:predictor to run with --predictor (its predictive cache; route-aware then reads its forecasts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moeflow import LLM, SamplingParams
from moeflow.assets import default_model_dir
from moeflow.bench.closed_loop import closed_loop
from moeflow.data.corpus import iter_jsonl
from moeflow.tokenizer import Tokenizer

PROMPT_LENGTHS = (20, 30, 40, 25, 35)


def prompts_from(path: str, tokenizer, n: int) -> list[list[int]]:
    encoded = (tokenizer.encode(d.text) for d in iter_jsonl(Path(path)))
    prompts = [ids[: PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]] for i, ids in enumerate(encoded)
               if len(ids) >= max(PROMPT_LENGTHS)][:n]
    if len(prompts) < n:
        raise SystemExit(f"{path} has {len(prompts)} documents of at least {max(PROMPT_LENGTHS)} tokens; "
                         f"--requests asks for {n}")
    return prompts


def run(args, policy: str, prompts: list[list[int]]) -> tuple[dict[str, list[int]], dict]:
    name, *options = policy.split(":")
    keys = {"wait": "max_decode_wait", "admit": "max_admit_wait"}
    engine_options = {keys[k]: int(v) for k, v in (o.split("=") for o in options if o != "predictor")}
    if "predictor" in options:
        engine_options["predictor"] = args.predictor
    llm = LLM(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto",
              max_model_len=max(PROMPT_LENGTHS) + args.tokens + 8, max_num_seqs=args.in_flight,
              max_batch_size=args.batch, expert_budget=args.budget, scheduling=name, **engine_options)
    t0 = time.perf_counter()
    run = closed_loop(llm.engine, prompts, SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True),
                      args.in_flight)
    tokens = {r: o.outputs[0].token_ids for r, o in run.outputs.items()}
    return tokens, {"policy": policy, "prefill_steps": run.prefill_steps,
                    "decode_steps": llm.engine.counters["decode_steps"],
                    "max_decode_wait": max(o.metrics.max_decode_wait_steps for o in run.outputs.values()),
                    "mib_moved": round(run.bytes_moved / 2**20, 1), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--data", required=True, help="a jsonl of corpus documents (tools/corpus_sample.py)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--in-flight", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="the most sequences one decode step takes")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--budget", default="25%")
    p.add_argument("--policies", default="fcfs,route-aware:admit=0,route-aware")
    p.add_argument("--device", default="cpu")
    p.add_argument("--predictor", default="auto", help="for policies with :predictor (default: the model's own)")
    args = p.parse_args()
    prompts = prompts_from(args.data, Tokenizer(args.model), args.requests)
    first = None
    for policy in args.policies.split(","):
        tokens, stats = run(args, policy, prompts)
        first = first or tokens
        stats["tokens_as_first"] = all(tokens[k] == first[k] for k in first)
        print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
