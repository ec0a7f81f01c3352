"""What the copy engine allows in a `moeflow bench offline` run: for each offloaded cell, the time its expert copies
take at the run's measured load rate (the copy engine's floor for the step), against the step itself and against
the LRU baseline's step in the same cell, at the bytes the configuration moved and at Belady's.

    python3 tools/copy_bound.py RESULTS.json

A ceiling of Nx means: even with every copy overlapped with compute, this configuration could run at most N times
the baseline's tokens/s at the bytes it moves (or at Belady's).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    args = p.parse_args()
    with open(args.results) as f:
        d = json.load(f)
    rate = d["meta"]["expert_load_bytes_per_s"]
    print(f"expert loads at {rate / 1e9:.2f} GB/s ({args.results})")
    print("| config | budget | batch | step ms | copies ms (busy) | Belady's copies ms | baseline step ms | "
          "ceiling at its bytes | ceiling at Belady's |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in d["runs"]:
        if r.get("system") != "moeflow" or r.get("fully_resident"):
            continue
        step = r["decode_s"] / r["decode_steps"]
        per_step = r["decode_tokens"] / r["decode_steps"]
        copies = r["bytes_moved"] / r["decode_steps"] / rate
        belady = r["belady_bytes_per_token"] * per_step / rate
        key = (r["budget"], r["batch"])
        base.setdefault(key, step)  # the first configuration of a cell is its baseline
        b = base[key]
        print(f"| {r['config']} | {r['budget']} | {r['batch']} | {step * 1e3:.2f} | {copies * 1e3:.2f} "
              f"({copies / step:.0%}) | {belady * 1e3:.2f} | {b * 1e3:.2f} | {b / copies:.2f}x | {b / belady:.2f}x |")


if __name__ == "__main__":
    main()
