"""Batch-1 offloaded decode on the GPU: what a run from a new pool costs against one from a pool emptied in
place, and where the host spends a decode step (cProfile).

    python tools/decode_profile.py [--budgets 100%,50%,25%] [--out DIR]

Model: a random-weight model of Qwen3-30B-A3B's shapes with 8 layers (as `moeflow bench offline --synthetic
qwen3-30b-a3b-8l`), bfloat16, 64-token prompts, 64 greedy tokens. For each budget:

- "new pool": the pool is allocated for the run, so its CUDA graphs are captured during the timed decode
  (what `moeflow bench offline` measured before the cache could be emptied in place; since the engine
  captures a pool's graphs when it makes the pool, this run no longer captures them while timed);
- "emptied in place": the same pool emptied, its graphs kept from the warm-up (what it measures now);
- a cProfile of one more emptied-in-place run: the host functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import torch


def main() -> None:
    from dataclasses import replace

    from moeflow.bench.runs import run_moeflow
    from moeflow.bench.workload import SyntheticWorkload
    from moeflow.config import EngineConfig
    from moeflow.engine.engine import LLMEngine
    from moeflow.weights.synthetic import SyntheticCheckpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="100%,50%,25%")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("decode_profile"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    checkpoint = SyntheticCheckpoint.preset("qwen3-30b-a3b-8l", seed=0, dtype=torch.bfloat16, device=device)
    engine = LLMEngine(EngineConfig(model="<synthetic>", device="cuda", dtype="bfloat16",
                                    max_model_len=64 + args.output_len + 8, max_num_seqs=1,
                                    max_num_batched_tokens=64),
                       skip_tokenizer_init=True, checkpoint=checkpoint)
    engine.store.fill_all(progress=False)
    batch = SyntheticWorkload(engine.spec.vocab_size, prompt_len=64, output_len=args.output_len, seed=1).requests(0, 1)
    short = [replace(r, params=replace(r.params, max_tokens=3)) for r in batch]
    rows = []
    for budget in args.budgets.split(","):
        other = "10%" if budget != "10%" else "25%"
        run_moeflow(engine, other, [short], warmup=short)  # a pool of another size, so the next run allocates anew
        new = run_moeflow(engine, budget, [batch])
        kept = run_moeflow(engine, budget, [batch], warmup=batch)
        prof = cProfile.Profile()
        prof.enable()
        profiled = run_moeflow(engine, budget, [batch], warmup=batch)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        name = f"cprofile-{budget.rstrip('%')}.txt"
        (args.out / name).write_text(text.getvalue())
        row = {"budget": budget, "new_pool_tokens_per_s": round(new.decode_tokens_per_s, 1),
               "emptied_in_place_tokens_per_s": round(kept.decode_tokens_per_s, 1),
               "under_cprofile_tokens_per_s": round(profiled.decode_tokens_per_s, 1),
               "misses_new": new.misses, "misses_kept": kept.misses, "cprofile": name}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "decode_profile.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": "qwen3-30b-a3b-8l (random)",
         "batch": 1, "prompt_len": 64, "output_len": args.output_len, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
