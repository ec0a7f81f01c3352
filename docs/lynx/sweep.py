"""LYNX (alpha, beta) sweep: perplexity, top-1 agreement and distinct experts per layer-step against exact
routing, on the same documents in the same decode batches (moeflow/evaluation/perplexity.py).

    PYTHONPATH=. python docs/lynx/sweep.py [MODEL_DIR] --data tests/data/heldout/*.jsonl --max-docs 256 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 0.5,1,2,3,5 --beta 1,2,3 [--resident-weight 0] [--device cpu]

One JSON line per configuration on stdout (exact first), then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--domains", default=None, help="comma list of domains to keep (default: all)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--max-tokens-per-doc", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alpha", default="0.5,1,2,3,5")
    p.add_argument("--beta", default="1,2,3")
    p.add_argument("--resident-weight", default="0")
    p.add_argument("--expert-budget", default="100%")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from moeflow.assets import default_model_dir
    from moeflow.evaluation.documents import load_documents
    from moeflow.evaluation.forcing import agreement, make_engine, mean_nll, teacher_force
    from moeflow.evaluation.perplexity import document_sequences
    from moeflow.routing.lynx import AffinityBinning

    domains = args.domains.split(",") if args.domains else None
    engine = make_engine(args.model or default_model_dir(), args.batch_size, args.max_tokens_per_doc,
                         device=args.device, expert_budget=args.expert_budget)
    seqs = document_sequences(engine.tokenizer, load_documents(args.data, args.split, domains, max_docs=args.max_docs),
                              args.max_tokens_per_doc)
    exact, st = teacher_force(engine, seqs, "exact")
    nll0, n = mean_nll(exact.values())
    rows = [dict(alpha=None, beta=None, w=None, perplexity=math.exp(nll0), agreement=1.0,
                 distinct=st.distinct_experts_per_layer_step, remapped=0.0, hit_rate=st.hit_rate,
                 mib_moved=st.cache.bytes_moved / 2**20, tokens=n,
                 docs=len(seqs))]
    print(json.dumps(rows[-1]), flush=True)
    for w in map(int, args.resident_weight.split(",")):
        for beta in map(int, args.beta.split(",")):
            for alpha in map(float, args.alpha.split(",")):
                engine.set_selector(AffinityBinning(alpha, beta, engine.spec.router, w))
                scored, st = teacher_force(engine, seqs, "lynx")
                nll, _ = mean_nll(scored.values())
                rows.append(dict(alpha=alpha, beta=beta, w=w, perplexity=math.exp(nll),
                                 agreement=agreement(scored, exact), distinct=st.distinct_experts_per_layer_step,
                                 remapped=st.remapped_share, hit_rate=st.hit_rate,
                                 mib_moved=st.cache.bytes_moved / 2**20,
                                 tokens=n, docs=len(seqs)))
                print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| alpha | beta | w | distinct/layer-step | vs exact | perplexity | vs exact | agreement | remapped | hit rate "
          "| MiB moved |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = ("exact", "", "") if r["alpha"] is None else (f"{r['alpha']:g}", r["beta"], r["w"])
        print(f"| {name[0]} | {name[1]} | {name[2]} | {r['distinct']:.2f} | {r['distinct'] / base['distinct'] - 1:+.1%} | "
              f"{r['perplexity']:.3f} | {r['perplexity'] / base['perplexity'] - 1:+.2%} | {r['agreement']:.3f} | "
              f"{r['remapped']:.1%} | {r['hit_rate']:.3f} | {r['mib_moved']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
