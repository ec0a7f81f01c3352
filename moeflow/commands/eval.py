"""`moeflow eval`: the accuracy of approximate routing modes against exact routing.

    moeflow eval perplexity [MODEL_DIR] --data FILE.jsonl|CORPUS|DIR --routing exact|lynx [--batch-size 32] [--json]
    moeflow eval choice [MODEL_DIR] --data CORPUS|FILE.jsonl|DIR --routing exact,lynx [--items 200] [--json]

Both teacher-force text through the engine in decode batches of --batch-size (moeflow/evaluation/).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    ppl = sub.add_parser("perplexity", help="perplexity, top-1 agreement and distinct experts, in decode mode",
                         description="Score documents in decode mode (teacher forcing, one token per step, "
                                     "--batch-size documents at a time) and report perplexity, top-1 agreement "
                                     "with exact routing and distinct experts per layer-step.")
    _common(ppl, routing_help="exact or lynx (lynx also runs exact, for agreement); default: %(default)s",
            routing_default="exact")
    ppl.add_argument("--max-tokens-per-doc", type=int, default=256,
                     help="tokens kept from the start of each document, BOS included (default: %(default)s)")
    ppl.add_argument("--max-docs", type=int, default=None, help="documents read at most (the domains in turn)")
    ppl.set_defaults(_task=_perplexity)
    ch = sub.add_parser("choice", help="multiple choice: a passage's true continuation among four",
                        description="Pick each passage's true continuation among four (three from other "
                                    "documents), by log-likelihood under teacher forcing; accuracy per routing mode.")
    _common(ch, routing_help="comma list of modes, exact always among them (default: %(default)s)",
            routing_default="exact,lynx")
    ch.add_argument("--items", type=int, default=200, help="items built (default: %(default)s)")
    ch.add_argument("--passage-tokens", type=int, default=32, help="passage length, BOS included (default: %(default)s)")
    ch.add_argument("--continuation-tokens", type=int, default=16, help="tokens per choice (default: %(default)s)")
    ch.add_argument("--seed", type=int, default=0,
                    help="draws the distractors, the answers' places and the order the choices run in")
    ch.set_defaults(_task=_choice)


def _common(p: argparse.ArgumentParser, routing_help: str, routing_default: str) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled tiny model)")
    p.add_argument("--data", action="append", required=True,
                   help="a .jsonl file of documents (doc_id, domain, text), a corpus directory (its --split), or a "
                        "directory of .jsonl files; repeatable")
    p.add_argument("--split", default="test", help="split read from a corpus directory (default: %(default)s)")
    p.add_argument("--domains", default=None, help="comma list of domains to keep (default: all)")
    p.add_argument("--routing", default=routing_default, help=routing_help)
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoding together (default: %(default)s)")
    g = p.add_argument_group("lynx")
    g.add_argument("--lynx-alpha", type=float, default=None, help="bin width 1/alpha (default: the model's)")
    g.add_argument("--lynx-beta", type=int, default=None, help="low bins (default: the model's)")
    g.add_argument("--lynx-resident-weight", type=int, default=0,
                   help="bin-0 votes a resident expert earns, offloaded mode (default: 0, plain LYNX)")
    e = p.add_argument_group("engine")
    e.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--expert-budget", default="100%", help="device memory for routed experts (default: %(default)s)")
    e.add_argument("--eviction", default="lru", choices=["lru", "lfu"])
    e.add_argument("--enforce-eager", action="store_true", help="never replay decode steps as CUDA graphs")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is often fastest for small models on shared cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def main(args: argparse.Namespace) -> int:
    return args._task(args)


def _setup(args: argparse.Namespace, routings: list[str], max_len: int):
    """(engine, the LYNX selector or None, the documents), after checking what the user gave."""
    from moeflow.assets import default_model_dir
    from moeflow.errors import ConfigError
    from moeflow.evaluation.documents import load_documents
    from moeflow.evaluation.forcing import check_batch_size, check_routings, make_engine
    from moeflow.routing.lynx import AffinityBinning
    from moeflow.weights.checkpoint import Checkpoint

    check_routings(routings)
    check_batch_size(args.batch_size)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    model_dir = str(args.model or default_model_dir())
    domains = args.domains.split(",") if args.domains else None
    docs = load_documents(args.data, args.split, domains, getattr(args, "max_docs", None))
    spec = Checkpoint(model_dir).spec
    if max_len > spec.max_position_embeddings:
        raise ConfigError(f"{max_len} tokens per sequence exceed the model's {spec.max_position_embeddings} positions")
    selector = None
    if "lynx" in routings:
        selector = AffinityBinning.for_spec(spec, args.lynx_alpha, args.lynx_beta, args.lynx_resident_weight)
    engine = make_engine(model_dir, args.batch_size, max_len, device=args.device, dtype=args.dtype,
                         expert_budget=args.expert_budget, eviction=args.eviction, enforce_eager=args.enforce_eager,
                         selector=selector)
    return model_dir, engine, selector, docs


def _described(args, model_dir, engine, selector) -> dict:
    out = {"model": model_dir, "data": args.data, "batch_size": args.batch_size, "device": str(engine.device),
           "dtype": str(engine.dtype).removeprefix("torch."), "expert_budget": args.expert_budget}
    if selector is not None:
        out["lynx"] = {"alpha": selector.alpha, "beta": selector.beta, "resident_weight": selector.resident_weight}
    return out


def _perplexity(args: argparse.Namespace) -> int:
    import json

    from moeflow.errors import ConfigError
    from moeflow.evaluation.perplexity import MIN_DOC_TOKENS, document_sequences, evaluate_perplexity
    from moeflow.markdown import table

    if args.max_tokens_per_doc < MIN_DOC_TOKENS:
        raise ConfigError(f"--max-tokens-per-doc must be at least {MIN_DOC_TOKENS}")
    if args.max_docs is not None and args.max_docs < 1:
        raise ConfigError("--max-docs must be at least 1")
    model_dir, engine, selector, docs = _setup(args, [args.routing], args.max_tokens_per_doc)
    seqs = document_sequences(engine.tokenizer, docs, args.max_tokens_per_doc)
    if not seqs:
        raise ConfigError(f"no document holds the {MIN_DOC_TOKENS} tokens scoring needs")
    runs = evaluate_perplexity(engine, seqs, [args.routing], show_progress=not args.no_progress)
    run, exact = runs[args.routing], runs["exact"]
    out = run.as_dict() | _described(args, model_dir, engine, selector)
    if run is not exact:
        out["exact"] = exact.as_dict()
        out["relative_perplexity_increase"] = run.perplexity / exact.perplexity - 1
        d0 = exact.stats.distinct_experts_per_layer_step
        out["distinct_experts_reduction"] = 1 - run.stats.distinct_experts_per_layer_step / d0 if d0 else 0.0
    if args.json:
        print(json.dumps(out))
        return 0
    rows = [(r.routing, f"{r.perplexity:.3f}", f"{r.agreement_top1:.4f}",
             f"{r.stats.distinct_experts_per_layer_step:.2f}", f"{r.stats.remapped_share:.1%}", r.tokens)
            for r in runs.values()]
    print(table(["routing", "perplexity", "top-1 agreement", "distinct experts / layer-step", "remapped picks",
                 "tokens"], rows, right_from=1))
    print(f"\n{run.documents} documents, batch {args.batch_size}, {model_dir} on {out['device']} ({out['dtype']})")
    return 0


def _choice(args: argparse.Namespace) -> int:
    import json

    from moeflow.errors import ConfigError
    from moeflow.evaluation.choice import build_items, evaluate_choice
    from moeflow.markdown import table

    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    if args.items < 1:
        raise ConfigError("--items must be at least 1")
    model_dir, engine, selector, docs = _setup(args, routings, args.passage_tokens + args.continuation_tokens)
    items = build_items(engine.tokenizer, docs, args.passage_tokens, args.continuation_tokens, args.items, args.seed)
    runs = evaluate_choice(engine, items, routings, show_progress=not args.no_progress, seed=args.seed)
    out = {"accuracy": {m: r.accuracy for m, r in runs.items()}, "items": len(items),
           "runs": {m: r.as_dict() for m, r in runs.items()}} | _described(args, model_dir, engine, selector)
    if args.json:
        print(json.dumps(out))
        return 0
    rows = [(r.routing, f"{r.accuracy:.3f}", f"{r.same_pick_as_exact:.3f}",
             f"{r.stats.distinct_experts_per_layer_step:.2f}") for r in runs.values()]
    print(table(["routing", "accuracy", "same pick as exact", "distinct experts / layer-step"], rows, right_from=1))
    print(f"\n{len(items)} items (chance 0.25), batch {args.batch_size}, {model_dir} on {out['device']}")
    return 0
