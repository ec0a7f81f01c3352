"""`moeflow trace`: record the routes a model takes over a data split (format: moeflow/routing/traces.py)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled tiny model)")
    p.add_argument("--data", required=True,
                   help="a corpus directory (with --split) or a .jsonl file of documents (doc_id, domain, text)")
    p.add_argument("--split", default="test", help="split to read from a corpus directory (default: test)")
    p.add_argument("--domains", default=None, help="comma list of domains to keep (default: all)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--max-tokens", type=int, default=200_000, help="stop after this many tokens in all")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens kept from the start of each document")
    p.add_argument("--batch-size", type=int, default=8, help="documents routed per prefill step")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def main(args: argparse.Namespace) -> int:
    import datetime
    import json
    from pathlib import Path

    from tqdm import tqdm

    import moeflow
    from moeflow.assets import default_model_dir
    from moeflow.config import EngineConfig
    from moeflow.data.corpus import iter_jsonl, iter_split
    from moeflow.engine.engine import LLMEngine
    from moeflow.errors import ConfigError
    from moeflow.routing.traces import TraceBuilder
    from moeflow.sampling import SamplingParams
    from moeflow.weights.checkpoint import Checkpoint

    if args.max_seq_len < 2 or args.batch_size < 1 or args.max_tokens < 1:
        raise ConfigError("--max-seq-len must be at least 2, --batch-size and --max-tokens at least 1")
    model_dir = str(args.model or default_model_dir())
    data = Path(args.data)
    if not data.exists():
        raise ConfigError(f"--data {data} does not exist")
    domains = args.domains.split(",") if args.domains else None
    docs = iter_split(data, args.split, domains) if data.is_dir() else iter_jsonl(data, domains)
    checkpoint = Checkpoint(model_dir)
    max_seq_len = min(args.max_seq_len, checkpoint.spec.max_position_embeddings - 1)
    engine = LLMEngine(EngineConfig(model=model_dir, device=args.device, dtype=args.dtype,
                                    max_model_len=max_seq_len + 1, max_num_seqs=args.batch_size,
                                    max_num_batched_tokens=args.batch_size * max_seq_len, enforce_eager=True,
                                    gate_ahead=True, async_scheduling=False),
                       checkpoint=checkpoint)
    spec = engine.spec
    # weights, router logits and the gate ahead's guesses too (eager prefill steps, each settled before the next is
    # launched: they are read from the device, which a step launched ahead would overwrite)
    engine.record.keep_full = True
    steps: list = []  # the step's (view, routes), read before the next step overwrites them
    engine.add_route_listener(lambda view, routes: steps.append((view, routes)))
    builder = TraceBuilder(spec.moe_layers, {
        "model": model_dir, "architecture": spec.architecture, "dtype": str(engine.dtype).removeprefix("torch."),
        "data": str(data), "split": args.split if data.is_dir() else None, "max_seq_len": max_seq_len,
        "date": datetime.date.today().isoformat(), "moeflow": moeflow.__version__,
    })
    params = SamplingParams(max_tokens=1, temperature=0.0)
    bar = tqdm(total=args.max_tokens, desc="tracing", unit="tok")
    batch: list = []

    def flush() -> None:
        for i, doc in enumerate(batch):
            engine.add_request(str(i), doc[1], params)
        while engine.has_unfinished_requests():
            steps.clear()
            engine.step()  # max_tokens=1: every step is one prefill
            for view, routes in steps:
                for i, rid in enumerate(view.request_ids):
                    rows = routes.rows[i]
                    # [L, n, .] -> [n, L, .]
                    stack = [a[:, rows].swapaxes(0, 1) for a in (routes.router_ids, routes.weights, routes.logits,
                                                                 routes.ahead_ids)]
                    doc, ids = batch[int(rid)]
                    builder.add(doc.doc_id, doc.domain, ids, *stack)
                    bar.update(rows.stop - rows.start)
        batch.clear()

    for doc in docs:
        if builder.num_tokens + sum(len(ids) for _, ids in batch) >= args.max_tokens:
            break
        ids = engine.tokenizer.encode(doc.text)[:max_seq_len]
        if len(ids) >= 2:
            batch.append((doc, ids))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    trace = builder.build()
    trace.save(args.out)
    print(json.dumps({"out": args.out, "tokens": trace.num_tokens, "sequences": len(trace.seq_doc_ids),
                      "domains": [str(d) for d in trace.domain_names]}))
    return 0
