"""What the commands share: subcommand tables, and the engine options of the commands that load a model."""

from __future__ import annotations

import argparse
import importlib


def add_subcommands(sub: argparse._SubParsersAction, table: dict[str, tuple[str, str]], main_attr: str) -> None:
    """One subparser per `table` entry, name -> (module, one-line help).

    Each module exposes `add_arguments(parser)` and `main(args) -> int`, the latter stored on the parsed
    arguments as `main_attr`. A module that is not part of this build is left out.
    """
    for name, (module_name, help_text) in table.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not module_name.startswith(exc.name):
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(**{main_attr: module.main})


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--expert-budget", default="100%",
                   help="device memory for routed experts: a share of all expert bytes ('25%%'), bytes ('8GiB'), "
                        "or slots per MoE layer ('2/layer'); default: %(default)s")
    g.add_argument("--eviction", default="lru", choices=["lru", "lfu"], help="expert-cache eviction policy")
    g.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; 'auto': float32 on CPU, the checkpoint's half type on CUDA")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output) per sequence")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences running at once, the KV cache's rows (default: --max-batch-size, else 16)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help="the most sequences one decode step takes (default: --max-num-seqs)")
    g.add_argument("--predictor", default=None,
                   help="expert predictor that plans what the cache holds: 'auto' (the predictor shipped with the "
                        "model, if any), a predictor directory, 'previous' or 'frequency' (default: none, load on "
                        "demand); the tokens are the same with any")
    g.add_argument("--scheduling", default="fcfs", choices=["fcfs", "route-aware"],
                   help="scheduling policy (default: %(default)s); route-aware picks decode batches by route")
    g.add_argument("--max-decode-wait", type=int, default=4,
                   help="route-aware: the most steps a running sequence may sit out beyond its round-robin share "
                        "of the decode steps (default: %(default)s)")
    g.add_argument("--max-admit-wait", type=int, default=None,
                   help="route-aware with experts offloaded: the most steps a new request is held back to be "
                        "prefilled with others (0: at once, as fcfs; default: the running sequences' wait bound)")
    g.add_argument("--routing-modes", default="exact,lynx",
                   help="routing requests may ask for: exact, and lynx (approximate batch-aware expert reduction); "
                        "default: %(default)s")
    g.add_argument("--seed", type=int, default=0, help="engine seed for requests that give none")
    g.add_argument("--enforce-eager", action="store_true", help="never replay decode steps as CUDA graphs")
    g.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="run each layer's norms, router, QK norm, rotary embedding and KV-cache write as fused "
                        "Triton kernels, a few launches a layer instead of dozens (default: on CUDA with Triton)")
    g.add_argument("--gate-ahead", action="store_true",
                   help="each MoE layer also guesses the next layer's experts with that layer's router, for the "
                        "predictive cache's correction (with --predictor); the tokens are the same")
    g.add_argument("--expert-rounds", type=int, default=0, metavar="N",
                   help="with a learned --predictor: an offloaded layer whose loads would evict experts worth more "
                        "than ones it holds computes its experts in rounds of at least N, each round's experts then "
                        "making room for the rest (fewer bytes moved at large decode batches; default: 0, off); "
                        "the tokens are the same")
    g.add_argument("--prefetch-margin", type=float, default=None, metavar="X",
                   help="with a learned --predictor: a prefetch may evict only an expert worth less than X times "
                        "the prefetched expert's chance of use (default: 0.25); higher prefetches more, so that "
                        "copies overlap compute rather than wait for their layer's router, for some more bytes; "
                        "the tokens are the same")
    g.add_argument("--overlap-output", action=argparse.BooleanOptionalAction, default=None,
                   help="build each step's outputs (detokenisation, responses) while the device runs the next "
                        "step; the same outputs, a step later (default: on CUDA)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the host takes the last one's tokens, so the host's work "
                        "between steps overlaps the device's (every expert resident, no predictor, fcfs; the "
                        "same tokens; default: on CUDA)")
    g.add_argument("--allow-nonfinite-weights", action="store_true",
                   help="load weights holding NaN or Inf instead of refusing the checkpoint")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(expert_budget=args.expert_budget, eviction=args.eviction, device=args.device, dtype=args.dtype,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, max_batch_size=args.max_batch_size,
                predictor=args.predictor, scheduling=args.scheduling, max_decode_wait=args.max_decode_wait,
                max_admit_wait=args.max_admit_wait,
                routing_modes=tuple(m for m in args.routing_modes.split(",") if m), seed=args.seed,
                enforce_eager=args.enforce_eager, fused_ops=args.fused_ops, gate_ahead=args.gate_ahead,
                expert_rounds=args.expert_rounds, prefetch_margin=args.prefetch_margin,
                overlap_output=args.overlap_output, async_scheduling=args.async_scheduling,
                allow_nonfinite_weights=args.allow_nonfinite_weights)
