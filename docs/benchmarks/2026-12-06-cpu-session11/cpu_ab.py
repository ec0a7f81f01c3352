"""Async scheduling on the CPU, off and on in alternation (a sanity check: on a CPU the host is the device, so
nothing can overlap; this measures what running ahead costs there, not what it gains on a GPU).

    PYTHONPATH=. python3 cpu_ab.py --data CORPUS [--batch-sizes 8,32] [--rounds 4] [--threads 2] [--out FILE]

For each batch size, `rounds` times async off then on, each a fresh LLM on the bundled moeflow-tiny (every
expert resident, fcfs): one untimed batch of the text workload (moeflow.bench.workload.TextWorkload: corpus
test-split prompts of 64-256 tokens, temperature 0.8, top_p 0.95, a seed each, EOS ignored, 48 output tokens),
then a timed batch of other prompts. Prints, per run, the engine's decode seconds and tokens (GenerateStats),
and per batch size the ratio of the summed decode tokens/s, on to off.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(data: str, batch: int, run_ahead: bool) -> dict:
    from moeflow import LLM
    from moeflow.assets import default_model_dir
    from moeflow.bench.workload import TextWorkload, load_documents

    llm = LLM(str(default_model_dir()), device="cpu", max_num_seqs=batch, async_scheduling=run_ahead)
    workload = TextWorkload(load_documents(data), llm.tokenizer.encode, output_len=48)
    for start in (0, batch):  # untimed, then timed
        requests = list(workload.requests(start, batch))
        llm.generate([r.prompt for r in requests], [r.params for r in requests])
    stats = llm.last_stats
    return {"batch": batch, "async": run_ahead, "decode_s": round(stats.decode_s, 4),
            "decode_tokens": stats.decode_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows, ratios = [], {}
    for b in map(int, args.batch_sizes.split(",")):
        runs = [run(args.data, b, ahead) for _ in range(args.rounds) for ahead in (False, True)]
        for r in runs:
            print(json.dumps(r))
        rate = {a: sum(r["decode_tokens"] for r in runs if r["async"] is a)
                / sum(r["decode_s"] for r in runs if r["async"] is a) for a in (False, True)}
        ratios[b] = round(rate[True] / rate[False], 3)
        print(json.dumps({"batch": b, "threads": args.threads, "async_vs_off": ratios[b]}))
        rows += runs
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "ratios": ratios, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
