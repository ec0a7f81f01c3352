"""`moeflow generate`: stream a completion to stdout, statistics to stderr."""

from __future__ import annotations

import argparse
import sys

from moeflow.commands.common import add_engine_arguments, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled tiny model)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--sampling-seed", type=int, default=None, help="seed for this request's sampling")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--routing", default="exact", choices=["exact", "lynx"],
                   help="exact (the model's own routing) or lynx (batch-aware expert reduction, approximate)")
    add_engine_arguments(p)


def main(args: argparse.Namespace) -> int:
    from moeflow.assets import default_model_dir
    from moeflow.llm import LLM
    from moeflow.sampling import SamplingParams

    _check_utf8(args.prompt)

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos,
                            routing=args.routing)
    llm = LLM(str(args.model or default_model_dir()), **engine_kwargs(args))
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = llm.last_stats
    c = out.outputs[0]
    print(f"[{c.finish_reason}] {len(c.token_ids)} tokens | {stats.summary()}", file=sys.stderr)
    return 0


def _check_utf8(prompt: str) -> None:
    """argv bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer can encode."""
    import os

    from moeflow.errors import RequestError
    from moeflow.tokenizer import lone_surrogate

    if (at := lone_surrogate(prompt)) is not None:
        raw = os.fsencode(prompt)
        byte = os.fsencode(prompt[at])
        raise RequestError(f"--prompt is not valid UTF-8 text: byte 0x{byte[0]:02x} at character {at} of "
                           f"{len(raw)} bytes; pass the prompt in UTF-8")
