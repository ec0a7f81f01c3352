"""`moeflow train`: train a reference MoE model, and `moeflow train card`: write its model card.

    moeflow train --preset tiny --data CORPUS --tokenizer TOKDIR --out OUT_DIR [--device cpu|cuda] [--seed 0]
                  [--max-minutes M] [--steps N] [--card]
    moeflow train card MODEL_DIR --data CORPUS [--max-tokens N]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from moeflow.errors import ConfigError
from moeflow.train.presets import PUBLIC_PRESETS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a Qwen3-MoE reference model with transformers on the moeflow corpus and save a Hugging Face "
        "checkpoint (safetensors, tokenizer files, training_log.json). `moeflow train card MODEL_DIR` writes "
        "the model card with held-out perplexity and routing statistics.")
    parser.add_argument("--preset", choices=PUBLIC_PRESETS + ("bench-smoke",), metavar="{tiny,bench}",
                        help="model size and recipe: tiny (committed, CPU) or bench (production-sized experts, GPU)")
    parser.add_argument("--data", type=Path, metavar="CORPUS", help="corpus directory from `moeflow data build`")
    parser.add_argument("--tokenizer", type=Path, metavar="TOKDIR", help="tokenizer directory (Hugging Face layout)")
    parser.add_argument("--out", type=Path, metavar="OUT_DIR", help="where the checkpoint is written")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="training device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default: 0)")
    parser.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                        help="optimizer steps (default: the preset's, or as many as --max-minutes allows)")
    parser.add_argument("--max-minutes", type=_positive_float, default=None, metavar="M",
                        help="hard wall-time bound for the whole command, start-up and save included")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice). On a CPU shared with other "
                        "jobs, set OMP_WAIT_POLICY=PASSIVE in the environment: spinning OpenMP threads that lose "
                        "their core slow training several-fold")
    parser.add_argument("--override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="replace a preset field, e.g. hidden_size=64 (for tests and experiments)")
    parser.add_argument("--card", action="store_true", help="write the model card after training")
    parser.add_argument("--card-max-tokens", type=_positive_int, default=None, metavar="N",
                        help="with --card: test tokens per domain to evaluate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub = parser.add_subparsers(dest="train_action", metavar="ACTION")
    card = sub.add_parser("card", help="write MODEL_DIR/README.md, routing_stats.json and expert_usage.png",
                          description="Measure a trained model on the corpus's held-out test split (perplexity "
                          "per domain beside a unigram baseline, expert-load entropy, layer-to-layer and "
                          "token-to-token routing predictability, per-domain expert usage) and write the "
                          "model card.")
    card.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    card.add_argument("--data", type=Path, required=True, metavar="CORPUS")
    card.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                      help="test (and validation) tokens per domain to evaluate (default: 65536)")
    card.add_argument("--device", choices=("cpu", "cuda"), default=None)
    card.add_argument("--threads", type=_positive_int, default=None, metavar="N")


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if getattr(args, "train_action", None) == "card":
        return _card(args)
    return _train(args, started)


def _card(args: argparse.Namespace) -> int:
    from moeflow.train.card import DEFAULT_MAX_TOKENS, write_card

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = write_card(args.model_dir, args.data, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
                      device=args.device)
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace, started: float) -> int:
    from moeflow.train.presets import get_preset
    from moeflow.train.trainer import TrainJob, train

    missing = [flag for flag, value in (("--preset", args.preset), ("--data", args.data),
                                        ("--tokenizer", args.tokenizer), ("--out", args.out)) if value is None]
    if missing:
        raise ConfigError(f"training needs {', '.join(missing)}")
    preset = get_preset(args.preset).with_overrides(dict(args.override))
    job = TrainJob(preset=preset, data_dir=args.data, tokenizer_dir=args.tokenizer, out_dir=args.out,
                   device=args.device or "auto", seed=args.seed, steps=args.steps, max_minutes=args.max_minutes,
                   threads=args.threads, progress=not args.no_progress,
                   command="moeflow train " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["train"]
                   else shlex.join(sys.argv))
    log = train(job, started=started)
    memory = f", peak GPU memory {log['peak_gpu_memory_gib']:.1f} GiB" if log["peak_gpu_memory_gib"] else ""
    print(f"trained {log['steps_done']} steps ({log['tokens_seen']:,} tokens, {log['tokens_per_s']:,.0f} tokens/s"
          f"{memory}) in {log['train_time_s']:.0f} s on {log['device']}; saved in {log['save_time_s']:.0f} s, "
          f"{log['wall_time_s']:.0f} s in all: train loss {log['final']['train_lm_loss']:.4f}, "
          f"validation loss {log['final']['validation_loss']:.4f}; wrote {args.out}")
    if args.card:
        from moeflow.train.card import DEFAULT_MAX_TOKENS, write_card

        path = write_card(args.out, args.data, max_tokens=args.card_max_tokens or DEFAULT_MAX_TOKENS,
                          device=log["device"])
        print(f"wrote {path}")
    return 0
