"""`moeflow bench offline`: one process, one model, the same prompts, every configuration side by side.

The grid is budget x batch size x configuration (predictor x routing x scheduling, axes.py), on a
workload (workload.py): by default the text workload, documents of the corpus test split on a trained
model with sampling; `--workload synthetic` (random ids, greedy) is for kernel speed and shapes no trained
model has, and its report says its routing is degenerate. Beside moeflow, on the same model and prompts:
transformers' generate with the whole model on the GPU, and transformers with accelerate offloading held
to the GPU memory of a moeflow budget. Every cell reports decode tokens/s, TTFT, TPOT, hit rate, bytes
moved per output token beside an optimal (Belady) cache's on the same uses, exposed copy stall, distinct
experts per layer-step and distinct output tokens per request; offloaded cells also their bandwidth
floors, and every non-baseline configuration its ratios to the baseline of the same cell.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
from collections.abc import Callable
from pathlib import Path


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (for --workload text: a trained model, with its tokenizer)")
    src.add_argument("--synthetic", help="a random-weight model of a real shape: qwen3-30b-a3b-8l or mixtral-8x7b "
                                         "(implies --workload synthetic)")
    p.add_argument("--synthetic-dir", default=None,
                   help="write the synthetic model here first, so transformers baselines can load it")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=["text", "synthetic"], default=None,
                   help="text (default): corpus test-split prompts, sampling; synthetic: random ids, greedy "
                        "(degenerate routing: kernel speed only)")
    w.add_argument("--data", default=None, help="text workload: a corpus directory (its test split), a directory "
                                                "of jsonl files or one jsonl file")
    w.add_argument("--min-prompt-len", type=int, default=64, help="text workload (default: %(default)s)")
    w.add_argument("--max-prompt-len", type=int, default=256, help="text workload (default: %(default)s)")
    w.add_argument("--prompt-len", type=int, default=64, help="synthetic workload (default: %(default)s)")
    w.add_argument("--output-len", type=int, default=64)
    w.add_argument("--temperature", type=float, default=0.8, help="text workload (default: %(default)s)")
    w.add_argument("--top-p", type=float, default=0.95, help="text workload (default: %(default)s)")
    w.add_argument("--batches-per-cell", type=int, default=3,
                   help="batches of different prompts each cell runs, timings summed (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the per-request sampling seeds")
    g = p.add_argument_group("grid")
    g.add_argument("--budgets", type=_csv(str), default=["100%", "50%", "25%", "10%"])
    g.add_argument("--batch-sizes", type=_csv(int), default=[1, 8, 32])
    g.add_argument("--predictors", type=_csv(str), default=["none"],
                   help="comma list: none, previous, frequency, a trained predictor's directory (PRED_DIR:no-PART "
                        "switches off one part of the predictive cache: quotas, protect, prefetch, correct, adapt; "
                        "PRED_DIR:KEY=V sets one of its settings, e.g. :prefetch_at=0.6:lookahead=3 or :by_value=0); "
                        "the first is the baseline")
    g.add_argument("--ablations", action="store_true",
                   help="after each trained predictor in --predictors, run it with each part switched off in turn")
    g.add_argument("--routing", type=_csv(str), default=["exact"],
                   help="comma list: exact, lynx[:alpha=A][:beta=B][:w=W][:kernel=torch|triton] (the model's "
                        "defaults, w=0: plain LYNX; w>0: cache-aware, resident experts earn w bin-0 votes; "
                        "kernel=triton: the rule in one launch per layer)")
    g.add_argument("--scheduling", type=_csv(str), default=["fcfs"],
                   help="comma list: fcfs, route-aware[:wait=W][:admit=A] (W: steps a sequence may wait beyond "
                        "its round-robin share; default the engine's, 4; A: steps a new request may be held back to "
                        "be prefilled with others, offloaded; default W's bound); either with :overlap=0|1 (a step's "
                        "outputs built between steps, or while the next runs; default: on CUDA) and :async=0|1 (a step "
                        "launched before the last is settled; default: on CUDA, where it applies)")
    g.add_argument("--configurations", type=_csv(str), default=None,
                   help="comma list of whole configurations, PREDICTOR/ROUTING/SCHEDULING each (e.g. "
                        "none/exact/fcfs,PRED_DIR/exact/route-aware), in place of the three lists' product; the "
                        "first is the baseline")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences running at once (default: the largest batch size)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help="the most sequences one decode step takes (default: --max-num-seqs)")
    g.add_argument("--eviction", default="lru", choices=["lru", "lfu"])
    b = p.add_argument_group("baselines")
    b.add_argument("--baselines", type=_csv(str), default=["transformers", "accelerate"],
                   help="comma list of: transformers, accelerate (or empty)")
    b.add_argument("--baseline-batch-sizes", type=_csv(int), default=None,
                   help="batch sizes for transformers (default: --batch-sizes)")
    b.add_argument("--accelerate-budget", default="25%", help="moeflow budget whose GPU memory accelerate is held to")
    b.add_argument("--accelerate-batch-sizes", type=_csv(int), default=[1, 8])
    b.add_argument("--accelerate-output-len", type=int, default=8)
    b.add_argument("--accelerate-batches", type=int, default=1, help="batches per accelerate cell (it is slow)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run, no floors
    p.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="the engine runs its norms, router, QK norm, rotary and KV write as fused kernels "
                        "(default: on CUDA with Triton)")
    p.add_argument("--gate-ahead", action="store_true",
                   help="each MoE layer guesses the next one's experts with its router, for the predictive cache")
    p.add_argument("--out", required=True, help="directory for results.json, results.md and the plots")
    p.add_argument("--title", default=None)


def _check(args: argparse.Namespace) -> str:
    """The workload to run, once the arguments are known to make sense together."""
    from moeflow.config import ExpertBudget
    from moeflow.errors import ConfigError

    workload = args.workload or ("synthetic" if args.synthetic else "text")
    if workload == "text" and args.synthetic:
        raise ConfigError("--workload text needs a trained --model: a random-weight model's routing is degenerate")
    if workload == "text" and not args.data:
        raise ConfigError("--workload text needs --data CORPUS_DIR (`moeflow data build DIR` makes one; a directory "
                          "or file of jsonl documents also works)")
    if args.batches_per_cell < 1 or args.accelerate_batches < 1:
        raise ConfigError("--batches-per-cell and --accelerate-batches must be at least 1")
    if not args.budgets or not args.batch_sizes or min(args.batch_sizes) < 1:
        raise ConfigError("--budgets and --batch-sizes need at least one value each, batch sizes >= 1")
    for budget in args.budgets:
        ExpertBudget.parse(budget)
    return workload


def build_workload(kind: str, args: argparse.Namespace, model_dir: str | None, vocab_size: int):
    from moeflow.bench.workload import SyntheticWorkload, TextWorkload, load_documents
    from moeflow.tokenizer import Tokenizer

    if kind == "synthetic":
        return SyntheticWorkload(vocab_size, prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed)
    tokenizer = Tokenizer(model_dir)
    return TextWorkload(load_documents(args.data), tokenizer.encode, min_len=args.min_prompt_len,
                        max_len=args.max_prompt_len, output_len=args.output_len, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, source=str(args.data))


def measure_grid(engine, workload, budgets: list[str], batch_sizes: list[int], configurations: list,
                 batches_per_cell: int, eviction: str = "lru", log: Callable[[str], None] = print) -> list:
    """Every budget (largest first: the resident run is every offloaded run's reference) x configuration x
    batch size. Timed batch j of batch size B takes requests j*B .. (j+1)*B-1 of the workload's stream, the
    same in every configuration; warm-ups take requests past every timed one. Configurations change inside
    a budget, so a selector's graphs are captured once per budget and configuration, not per cell."""
    from moeflow.bench import axes
    from moeflow.bench.runs import run_moeflow

    axes.check(configurations, engine)
    warm_at = batches_per_cell * max(batch_sizes)
    results = []
    for budget in sorted(dict.fromkeys(budgets), key=lambda b: -_budget_device_bytes(engine, b)):
        for conf in configurations:
            for batch in batch_sizes:
                axes.apply(conf, engine)  # every cell's predictor starts with no history
                timed = [[r.with_routing(conf.request_routing) for r in workload.requests(j * batch, batch)]
                         for j in range(batches_per_cell)]
                warm = [r.with_routing(conf.request_routing) for r in workload.requests(warm_at, batch)]
                r = run_moeflow(engine, budget, timed, warm, eviction=eviction, configuration=conf.as_dict())
                results.append(r)
                log(_line(r, conf.label))
    engine.set_predictor(None)
    return results


def _line(r, label: str) -> str:
    belady = r.belady_bytes_per_token
    traffic = (f"{r.bytes_per_token / 1e6:8.1f} MB/tok (Belady {belady / 1e6:.1f})" if belady is not None
               else " " * 8 + "resident")
    graphs = f", {r.graph_captures} GRAPHS CAPTURED" if r.graph_captures else ""
    tokens = r.as_dict()
    return (f"moeflow {r.budget:>6} {label} batch {r.batch:>3}: {r.decode_tokens_per_s:9.1f} tok/s, TTFT "
            f"{r.ttft_s * 1e3:7.1f} ms, hit rate {r.hit_rate:6.1%}, {traffic}, stall {r.stall_share:5.1%}, "
            f"distinct tokens/request {tokens['distinct_tokens_mean']:.1f} (min {tokens['distinct_tokens_min']})"
            f"{graphs}")


def main(args: argparse.Namespace) -> int:
    import torch

    from moeflow.bench import axes
    from moeflow.bench.floors import device_memory_bandwidth, expert_load_bandwidth, pinned_h2d_bandwidth
    from moeflow.bench.report import summary_table, write_report
    from moeflow.config import CacheConfig, EngineConfig, ExpertBudget
    from moeflow.engine.engine import LLMEngine
    from moeflow.errors import ConfigError
    from moeflow.weights.checkpoint import Checkpoint
    from moeflow.weights.synthetic import SyntheticCheckpoint, write_checkpoint

    kind = _check(args)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("moeflow bench offline measures GPU configurations and needs a CUDA device")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.configurations is not None:
        if args.ablations or (args.predictors, args.routing, args.scheduling) != (["none"], ["exact"], ["fcfs"]):
            raise ConfigError("--configurations names whole configurations: leave out --predictors, --routing, "
                              "--scheduling and --ablations")
        configurations = axes.listed(args.configurations)
    else:
        predictors = axes.with_ablations(args.predictors) if args.ablations else args.predictors
        configurations = axes.grid(predictors, args.routing, args.scheduling)

    checkpoint, model_dir = None, args.model
    if args.synthetic:
        checkpoint = SyntheticCheckpoint.preset(args.synthetic, seed=args.seed, dtype=dtype, device=device)
        if args.synthetic_dir:
            model_dir = str(write_checkpoint(checkpoint, Path(args.synthetic_dir)))
            os.sync()  # the checkpoint's dirty pages are written back now, not during the timed runs
    if checkpoint is None:
        checkpoint = Checkpoint(model_dir)
    prompt_len = args.max_prompt_len if kind == "text" else args.prompt_len
    rows = args.max_num_seqs or max(args.batch_sizes)
    # the engine starts on a small pool that reads no expert (each run sets its own budget) and with the first
    # configuration's scheduling policy; every axis value is loaded once before the experts are read, so that
    # a bad one fails in seconds
    start_budget = ExpertBudget("per_layer", checkpoint.spec.router.top_k)
    config = EngineConfig(model=model_dir or "<synthetic>", device=args.device, dtype=args.dtype,
                          max_model_len=prompt_len + args.output_len + 8, max_num_seqs=rows,
                          max_batch_size=args.max_batch_size, max_num_batched_tokens=rows * prompt_len,
                          cache=CacheConfig(budget=start_budget), fused_ops=args.fused_ops,
                          gate_ahead=args.gate_ahead)
    policy = axes.load_scheduling_arg(configurations[0].scheduling, checkpoint.spec)
    engine = LLMEngine(config, skip_tokenizer_init=True, checkpoint=checkpoint, scheduling=policy)
    spec = engine.spec
    axes.check(configurations, engine)
    _check_budgets(engine, args.budgets + [args.accelerate_budget])
    workload = build_workload(kind, args, model_dir, spec.vocab_size)
    engine.store.fill_all(progress=True)  # reading experts from disk is start-up, not a step's stall
    bandwidths = {"pinned_h2d_bytes_per_s": None, "device_memory_bytes_per_s": None,
                  "expert_load_bytes_per_s": None, "plain_copy_same_bytes_per_s": None}
    if cuda:
        layer_bytes = spec.num_experts * engine.store.expert_bytes
        bandwidths = {"pinned_h2d_bytes_per_s": pinned_h2d_bandwidth(64 * engine.store.expert_bytes, device),
                      "device_memory_bytes_per_s": device_memory_bandwidth(device),
                      # the copy engine against one plain pinned copy of the same bytes (one layer's experts)
                      "expert_load_bytes_per_s": expert_load_bandwidth(engine),
                      "plain_copy_same_bytes_per_s": pinned_h2d_bandwidth(layer_bytes, device)}
        bw, load, plain = (bandwidths[k] for k in ("pinned_h2d_bytes_per_s", "expert_load_bytes_per_s",
                                                   "plain_copy_same_bytes_per_s"))
        print(f"pinned host->device: {bw / 1e9:.1f} GB/s; device memory: "
              f"{bandwidths['device_memory_bytes_per_s'] / 1e12:.2f} TB/s; expert loads: {load / 1e9:.1f} GB/s, "
              f"{load / plain:.1%} of a plain pinned copy of the same {layer_bytes / 1e6:.0f} MB")
    if workload.note:
        print(workload.note)

    results = measure_grid(engine, workload, args.budgets, args.batch_sizes, configurations, args.batches_per_cell,
                           eviction=args.eviction)
    accelerate_gpu_bytes = _budget_device_bytes(engine, args.accelerate_budget)
    embedding = engine.model.w["model.embed_tokens.weight"]
    sizes = {"expert_bytes": engine.store.expert_bytes, "dense_bytes": engine.model.dense_bytes(),
             "embedding_bytes": embedding.numel() * embedding.element_size()}
    captures, capture_s, graph_bytes = engine.graph_captures, engine.graph_capture_s, engine.graph_memory_bytes
    warmup_s, fused_ops = engine.warmup_s, engine.model.fused
    del engine, embedding
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    if model_dir:
        results += run_baselines(model_dir, dtype, device, workload, args, accelerate_gpu_bytes)

    meta = {
        "title": args.title or f"moeflow bench offline: {args.synthetic or Path(args.model).name}, {kind} workload",
        "date": datetime.date.today().isoformat(),
        "command": "moeflow bench offline " + " ".join(_argv(args)),
        "machine": (f"{torch.cuda.get_device_name(device)}, " if cuda else "CPU only (no floors), ")
                   + f"{platform.machine()}, torch {torch.__version__}",
        "model": args.synthetic or args.model, "architecture": spec.architecture,
        "model_validation_loss": _validation_loss(args.model),
        "shape": {"layers": spec.num_layers, "experts": spec.num_experts, "top_k": spec.router.top_k,
                  "hidden": spec.hidden_size, "expert_width": spec.expert_width},
        **sizes, **bandwidths, "dtype": args.dtype, "num_moe_layers": spec.num_moe_layers,
        "workload": workload.describe(), "workload_note": workload.note, "batches_per_cell": args.batches_per_cell,
        "configurations": [c.as_dict() for c in configurations],
        "engine": {"max_num_seqs": rows, "max_batch_size": args.max_batch_size or rows, "eviction": args.eviction,
                   "fused_ops": fused_ops, "gate_ahead": args.gate_ahead, "graph_captures_total": captures,
                   "graph_capture_s": capture_s, "graph_memory_bytes": graph_bytes, "prefill_warmup_s": warmup_s},
    }
    write_report(out, meta, results, args.accelerate_budget)
    print(summary_table(meta, results))
    return 0


def run_baselines(model_dir: str, dtype, device, workload, args: argparse.Namespace, accelerate_gpu_bytes: int,
                  log: Callable[[str], None] = print) -> list:
    """transformers on the GPU, and transformers + accelerate held to `accelerate_gpu_bytes`, on the same
    requests as moeflow's cells of the same batch size."""
    results = []
    batch_sizes = args.baseline_batch_sizes or args.batch_sizes
    if "transformers" in args.baselines:
        results += _baseline(model_dir, dtype, "transformers", f"all on {device.type.upper()}", batch_sizes,
                             workload, args.batches_per_cell, args.output_len, log, device_map=str(device))
    if "accelerate" in args.baselines:
        if device.type != "cuda":
            log("transformers+accelerate: skipped, it offloads from a GPU")
        else:
            gib = accelerate_gpu_bytes / 2**30
            results += _baseline(model_dir, dtype, "transformers+accelerate", f"{gib:.2f} GiB GPU",
                                 args.accelerate_batch_sizes, workload, args.accelerate_batches,
                                 args.accelerate_output_len, log, device_map="auto",
                                 max_memory={0: f"{gib:.2f}GiB", "cpu": "200GiB"})
    return results


def _baseline(model_dir, dtype, system, budget, batch_sizes, workload, batches, output_len, log, **load_kwargs):
    import torch
    import transformers as tf

    from moeflow.bench.runs import run_transformers

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **load_kwargs).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = []
    for batch in batch_sizes:
        timed = [workload.requests(j * batch, batch) for j in range(batches)]
        r = run_transformers(model, system, budget, timed, output_len, pad_token_id=pad)
        out.append(r)
        d = r.as_dict()
        log(f"{system} batch {batch:>3}: {r.decode_tokens_per_s:9.1f} tok/s, TTFT {r.ttft_s * 1e3:8.1f} ms, "
            f"peak {r.peak_device_bytes / 2**30:.2f} GiB, distinct tokens/request {d['distinct_tokens_mean']:.1f} "
            f"(min {d['distinct_tokens_min']})")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _check_budgets(engine, budgets: list[str]) -> None:
    """Refuse, before any run, a budget too small for one layer's top-k."""
    from moeflow.config import ExpertBudget
    from moeflow.errors import ConfigError

    spec = engine.spec
    for budget in budgets:
        slots = ExpertBudget.parse(budget).num_slots(expert_bytes=engine.store.expert_bytes,
                                                     num_moe_layers=spec.num_moe_layers, num_experts=spec.num_experts)
        if slots < spec.router.top_k:
            raise ConfigError(f"budget {budget} buys {slots} expert slots; one layer's top-{spec.router.top_k} "
                              "needs more")


def _budget_device_bytes(engine, budget: str) -> int:
    """GPU memory moeflow needs at `budget`: the expert pool plus the dense weights."""
    from moeflow.config import ExpertBudget

    spec = engine.spec
    slots = ExpertBudget.parse(budget).num_slots(expert_bytes=engine.store.expert_bytes,
                                                 num_moe_layers=spec.num_moe_layers, num_experts=spec.num_experts)
    return slots * engine.store.expert_bytes + engine.model.dense_bytes()


def _validation_loss(model_dir: str | None) -> float | None:
    """The validation loss `moeflow train` recorded beside a model, if it did."""
    path = Path(model_dir) / "training_log.json" if model_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["final"]["validation_loss"]
    except (ValueError, KeyError, TypeError):
        return None


def _argv(args: argparse.Namespace) -> list[str]:
    """The command's arguments as given or defaulted, less those its workload does not read."""
    skip = {"command", "benchmark", "_main", "_bench_main"}
    if (args.workload or ("synthetic" if args.synthetic else "text")) == "text":
        skip |= {"prompt_len"}
    else:
        skip |= {"data", "min_prompt_len", "max_prompt_len", "temperature", "top_p"}
    if args.configurations is not None:  # the three lists' defaults would make the command refuse itself
        skip |= {"predictors", "routing", "scheduling"}
    parts = []
    for k, v in vars(args).items():
        if k == "fused_ops" and v is False:  # its default (None) is on where it runs: off is a flag of its own
            parts.append("--no-fused-ops")
        if k in skip or v is None or v is False or (k == "device" and v == "cuda"):
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [flag, shlex.quote(",".join(map(str, v)))]
        else:
            parts += [flag, shlex.quote(str(v))]
    return parts
