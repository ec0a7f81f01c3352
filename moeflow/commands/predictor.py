"""`moeflow predictor train|eval`: train a routing-path predictor from traces, and score it (recall, baselines,
and a replay of the trace through the real expert cache)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a predictor for a model from its `moeflow trace` files",
                       description="Train a routing-path predictor for MODEL_DIR from traces of it; writes PRED_DIR "
                                   "(predictor.safetensors, config.json, training_log.json, loss_curve.png).")
    t.add_argument("model", help="model directory the traces were recorded from")
    t.add_argument("--traces", required=True, help="comma list of trace files (.npz)")
    t.add_argument("--out", required=True, help="predictor directory to write")
    t.add_argument("--holdout-domain", default=None, help="train on every domain but this one")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=None, help="tokens per step (default: 1024 on CPU, 4096 on CUDA)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--hidden", type=int, default=None,
                   help="width of the network (default: the widest within 2%% of the model's bytes, at most 1024)")
    t.add_argument("--horizon", type=int, default=2,
                   help="tokens ahead the second head (the cache's look-ahead) predicts: an expert used by any of "
                        "the next N tokens (default: %(default)s; on moeflow-tiny's replay at 25%%, batch 1, 2 moved "
                        "4%% fewer bytes than 1)")
    t.add_argument("--lens-width", type=int, default=0,
                   help="feed the network each MoE router's view of the token alone (its router on the token's "
                        "embedding), projected to this width; 0: not (default)")
    t.add_argument("--cur-width", type=int, default=96,
                   help="width the token's embedding is projected to (default: %(default)s)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(_action=train_main)

    e = sub.add_parser("eval", help="score a predictor on a trace: recall, baselines and a cache replay",
                       description="Score PRED_DIR on a trace of its model: recall of each token's experts, batch "
                                   "union recall, the same for cheap baselines, and a replay of the trace through "
                                   "the real expert cache (LRU, the predictive cache, Belady).")
    e.add_argument("pred_dir")
    e.add_argument("--trace", required=True, help="comma list of trace files to score on")
    e.add_argument("--model", default=None,
                   help="model directory (default: the model directory the predictor sits in or beside, else the "
                        "bundled tiny model)")
    e.add_argument("--fit-traces", default=None,
                   help="traces to fit the baselines on (default: the predictor's training traces, if still there)")
    e.add_argument("--budgets", default="10%,25%,50%")
    e.add_argument("--batch-sizes", default="1,8,32")
    e.add_argument("--ablations", action="store_true", help="also replay with each part of the predictive cache off")
    e.add_argument("--gate-ahead", action="store_true",
                   help="also replay the predictive cache hearing the trace's gate-ahead guesses (policy gate-ahead)")
    e.add_argument("--replay-tokens", type=int, default=20000, help="trace tokens replayed per configuration")
    e.add_argument("--domains", default=None, help="score only these domains (comma list)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    e.set_defaults(_action=eval_main)


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return args._action(args)


def _traces(text: str) -> list:
    from pathlib import Path

    from moeflow.errors import ConfigError
    from moeflow.routing.traces import Trace

    paths = [Path(p) for p in text.split(",") if p]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ConfigError(f"trace file(s) not found: {', '.join(missing) or text!r}")
    out = []
    for p in paths:
        try:
            t = Trace.load(p)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        t.meta["path"] = str(p.resolve())
        out.append(t)
    return out


def train_main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moeflow.engine.setup import resolve_device
    from moeflow.routing.predictors.training import TrainOptions, plot_loss, train
    from moeflow.weights.checkpoint import Checkpoint

    device = resolve_device(args.device)
    checkpoint = Checkpoint(args.model)
    traces = _traces(args.traces)
    batch = args.batch_size or (4096 if device.type == "cuda" else 1024)
    options = TrainOptions(epochs=args.epochs, batch_size=batch, lr=args.lr, hidden=args.hidden,
                           holdout_domain=args.holdout_domain, max_minutes=args.max_minutes, seed=args.seed,
                           horizon=args.horizon, lens_width=args.lens_width, cur_width=args.cur_width)
    files, log = train(checkpoint, traces, options, device, progress=not args.no_progress)
    files.training["trace_files"] = [t.meta["path"] for t in traces]
    out = files.save(args.out)
    (Path(out) / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot = plot_loss(log, Path(out) / "loss_curve.png")
    size = (Path(out) / "predictor.safetensors").stat().st_size
    summary = {"out": str(out), "bytes": size, "params": files.training["params"], "train_s": round(log["train_s"], 1),
               "val": {k: v for k, v in files.metrics.items() if k in ("recall", "recall_refined", "loss")},
               "loss_curve": str(plot) if plot else None}
    if "heldout" in files.metrics:
        summary["heldout"] = {k: files.metrics["heldout"][k] for k in ("recall", "recall_refined", "loss")}
    print(json.dumps(summary))
    return 0


def _model_for(pred_dir, explicit: str | None):
    from pathlib import Path

    from moeflow.assets import default_model_dir
    from moeflow.weights.checkpoint import Checkpoint

    if explicit:
        return Checkpoint(explicit)
    p = Path(pred_dir).resolve()
    for cand in (p.parent, p.with_name(p.name.removesuffix("-predictor").removesuffix(".predictor"))):
        if cand != p and (cand / "config.json").is_file() and any(cand.glob("*.safetensors*")):
            return Checkpoint(cand)
    return Checkpoint(default_model_dir())


def eval_main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from moeflow.config import ExpertBudget
    from moeflow.errors import ConfigError
    from moeflow.evaluation.predictors import ABLATIONS, POLICIES, evaluate
    from moeflow.routing.predictors.net import PredictorFiles

    for b in args.budgets.split(","):
        ExpertBudget.parse(b)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: a comma list of integers") from None
    checkpoint = _model_for(args.pred_dir, args.model)
    traces = _traces(args.trace)
    if args.domains:
        keep = set(args.domains.split(","))
        traces = [_only_domains(t, keep) for t in traces]
    fit = None
    if args.fit_traces:
        fit = _traces(args.fit_traces)
    else:
        recorded = PredictorFiles.load(args.pred_dir).training.get("trace_files") or []
        if recorded and all(Path(p).is_file() for p in recorded):
            fit = _traces(",".join(recorded))
    policies = list(POLICIES) + (list(ABLATIONS) if args.ablations else [])
    if args.gate_ahead:
        if any(t.ahead_ids is None for t in traces):
            raise ConfigError("--gate-ahead: a trace holds no gate-ahead guesses (moeflow trace records them since "
                              "2026-12-05; trace the model again)")
        policies.append("gate-ahead")
    report = evaluate(args.pred_dir, checkpoint, traces, fit, args.budgets.split(","), batch_sizes, policies,
                      args.replay_tokens, args.device, progress=not args.json)
    if args.json:
        print(json.dumps(report, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))
    else:
        print(format_report(report))
    return 0


def _only_domains(trace, keep: set[str]):
    import numpy as np

    from moeflow.errors import ConfigError
    from moeflow.routing.traces import Trace

    names = [str(d) for d in trace.domain_names]
    if not keep & set(names):
        raise ConfigError(f"--domains {','.join(sorted(keep))}: the trace holds {', '.join(names)}")
    seq_keep = np.array([names[d] in keep for d in trace.seq_domains])
    rows = seq_keep[trace.seq_ids]
    remap = np.cumsum(seq_keep) - 1
    return Trace(trace.token_ids[rows], trace.positions[rows], remap[trace.seq_ids[rows]].astype(np.int32),
                 trace.topk_ids[rows], trace.topk_weights[rows], trace.router_logits[rows],
                 trace.seq_domains[seq_keep], trace.seq_doc_ids[seq_keep], trace.domain_names, trace.moe_layers,
                 trace.meta, None if trace.ahead_ids is None else trace.ahead_ids[rows])


def format_report(r: dict) -> str:
    from moeflow.markdown import table

    batch_keys = list(r["recall"]["union_recall"])
    head = ["predictor", "recall", "refined", "recall@2K"] + [f"union B={b}" for b in batch_keys]

    def row(name: str, d: dict) -> list:
        return [name, f"{d['recall']:.3f}", f"{d['recall_refined']:.3f}", f"{d['recall_at_2k']:.3f}"] + [
            f"{d['union_recall'][b]:.3f}" for b in batch_keys]

    rows = [row("learned", r["recall"])] + [row(n, d) for n, d in r["baselines"].items()]
    domains = list(r["recall"]["recall_per_domain"])
    drows = [[n] + [f"{d['recall_per_domain'].get(dom, float('nan')):.3f}" for dom in domains]
             for n, d in [("learned", r["recall"]), *r["baselines"].items()]]
    crows = [[c["budget"], c["batch"], c["policy"], f"{c['hit_rate']:.3f}", f"{c['bytes_per_token'] / 2**20:.3f}",
              "" if c["vs_belady"] is None else f"{c['vs_belady']:.2f}x", c["prefetches"], c["prefetch_hits"],
              c["wasted_prefetches"]] for c in r["cache"]]
    parts = [f"{r['tokens']} tokens scored ({', '.join(r['domains'])}); predictor {r['predictor']}"]
    if "note" in r:
        parts.append(r["note"])
    parts += ["", "recall of each token's top-k (union: decode batches of B sequences)", table(head, rows, 1), "",
              "recall by domain", table(["predictor", *domains], drows, 1), "",
              "cache replay (bytes per token in MiB; Belady: optimal cache of the same slots)",
              table(["budget", "batch", "policy", "hit rate", "MiB/token", "vs Belady", "prefetches", "used",
                     "wasted"], crows, 3)]
    return "\n".join(parts)
