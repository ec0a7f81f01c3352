"""The server's garbage-collector pauses with the start-up heap frozen and without, side by side.

    PYTHONPATH=. python3 tools/gc_pause_ab.py --data CORPUS_DIR [--model DIR] [--device cpu] [--rounds 1]
        [--num-prompts 128] [--max-concurrency 32] [--output-len 32]

First, in this process: the objects the collector tracks once the engine is built, and how long a full
collection of them takes (three, the fastest). Then `moeflow serve` in a subprocess, once as it ships (heap frozen
at start-up) and once with the freeze skipped, each loaded by `moeflow bench serve --dataset text`; for each, the
report's line of the server's collections (all of them, the full ones, their time, those over 50 ms) and its
median and p99 time to first token. Arms alternate over --rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SERVE = ("import sys{patch}\nfrom moeflow.cli import main\n"
         "sys.exit(main(['serve', {model!r}, '--port', {port!r}, '--device', {device!r}, '--log-level', 'warning']))")
SKIP_FREEZE = "\nimport moeflow.server.gc_pauses as g\ng.freeze_start_up_heap = lambda: 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heap_probe(model: str, device: str) -> tuple[int, float]:
    from moeflow.llm import LLM

    llm = LLM(model, device=device)  # noqa: F841 (held while the heap is measured)
    gc.collect()
    objects = len(gc.get_objects())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t)
    return objects, best


def serve_arm(args, freeze: bool, out: Path) -> dict:
    port = str(_free_port())
    code = SERVE.format(patch="" if freeze else SKIP_FREEZE, model=args.model, port=port, device=args.device)
    server = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        subprocess.run([sys.executable, "-m", "moeflow.cli", "bench", "serve", "--base-url", base, "--dataset",
                        "text", "--data", args.data, "--num-prompts", str(args.num_prompts), "--request-rate", "inf",
                        "--max-concurrency", str(args.max_concurrency), "--output-len", str(args.output_len),
                        "--disable-tqdm", "--result-file", str(out)], check=True, stdout=subprocess.DEVNULL)
    finally:
        server.terminate()
        server.wait(30)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="corpus directory for the text prompts")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    if args.model is None:
        from moeflow.assets import default_model_dir

        args.model = str(default_model_dir())
    objects, seconds = heap_probe(args.model, args.device)
    print(f"a process holding the engine: {objects:,} tracked objects, a full collection {seconds * 1e3:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for freeze in (True, False):
                res = serve_arm(args, freeze, Path(tmp) / f"{r}-{freeze}.json")
                g = res["server_gc"]
                print(f"round {r + 1}, heap {'frozen' if freeze else 'not frozen'}: {g['collections']:.0f} "
                      f"collections ({g['full']:.0f} full), {g['seconds'] * 1e3:.1f} ms in all, "
                      f"{g['over_50ms']:.0f} over 50 ms; TTFT median {res['median_ttft_ms']:.0f} ms, "
                      f"p99 {res['p99_ttft_ms']:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
