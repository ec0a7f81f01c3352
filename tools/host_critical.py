"""The host time a decode step spends where the device has nothing to run, with outputs built between steps
and while the next one runs (EngineConfig.overlap_output).

    PYTHONPATH=. python3 tools/host_critical.py [--model DIR] --data CORPUS [--batch-sizes 8,32,64]
        [--device cpu|cuda] [--out FILE.json]

For each batch size and each setting (overlap off, then on), on one engine per setting: B requests of the text
workload (moeflow.bench.workload.TextWorkload: corpus test-split prompts of 64-256 tokens, the domains in turn,
temperature 0.8, top_p 0.95, a seed each, EOS ignored), 48 output tokens; one untimed batch, then one timed. Per decode step it reports, in microseconds:
`before_launch` (from the call to `step` until the model is launched: scheduling and the step's inputs),
`after_sync` (from the token sync to the end of the call: routes, accounting, each sequence's token, and without
overlap the outputs), `waited` (from the end of the host's launches, or of the output building that follows them,
to the sync: on a GPU mostly the host waiting for the device, on the CPU the little host work between them), and with overlap `built_during_step` (the
outputs built while the device runs the step). On a GPU the device idles for before_launch + after_sync; the
outputs built during the step are hidden. On the CPU the host is the device, so only the host's share is
meaningful there, not the step's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(model: str, data: str, batch: int, overlap: bool, device: str, output_len: int) -> dict:
    from moeflow import LLM
    from moeflow.bench.workload import TextWorkload, load_documents

    # steps settled one by one (async scheduling, CUDA's default since the twelfth session, would settle each in
    # the next call and hide the host's work this tool measures)
    llm = LLM(model, device=device, max_num_seqs=batch, overlap_output=overlap, async_scheduling=False)
    workload = TextWorkload(load_documents(data), llm.tokenizer.encode, output_len=output_len)
    engine = llm.engine
    marks: dict[str, float] = {}

    def wrap(obj, name: str, before: str | None = None, after: str | None = None) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if before:
                marks[before] = time.perf_counter()
            result = inner(*args, **kwargs)
            if after:
                marks[after] = time.perf_counter()
            return result

        setattr(obj, name, timed)

    wrap(engine.runner, "run", before="launch")
    wrap(engine.sampler, "sample", after="sampled")
    wrap(engine, "_emit_unemitted", before="emit_in", after="emit_out")
    wrap(engine.model.record, "read", before="synced")  # read right after the token sync
    totals = {"before_launch": 0.0, "after_sync": 0.0, "waited": 0.0, "built_during_step": 0.0}

    def run(tag: str, start: int, timed: bool) -> int:
        for i, r in enumerate(workload.requests(start, batch)):
            engine.add_request(f"{tag}-{i}", r.prompt, r.params)
        steps = 0
        while engine.has_unfinished_requests():
            marks.clear()
            was = engine.counters["decode_steps"]
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            if not timed or engine.counters["decode_steps"] == was:
                continue
            steps += 1
            totals["before_launch"] += marks["launch"] - t0
            totals["after_sync"] += t1 - marks["synced"]
            totals["waited"] += marks["synced"] - (marks["emit_out"] if overlap else marks["sampled"])
            if overlap:
                totals["built_during_step"] += marks["emit_out"] - marks["emit_in"]
        return steps

    run("warm", 0, False)
    steps = run("timed", batch, True)
    row = {k: round(1e6 * v / steps, 1) for k, v in totals.items()}
    if not overlap:
        del row["built_during_step"]
    return {"batch": batch, "overlap_output": overlap, "decode_steps": steps, **row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled moeflow-tiny)")
    p.add_argument("--data", required=True, help="the corpus directory (its test split prompts the requests)")
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch

    from moeflow.assets import default_model_dir

    torch.manual_seed(0)
    model = args.model or str(default_model_dir())
    rows = [measure(model, args.data, int(b), overlap, args.device, args.output_len)
            for b in args.batch_sizes.split(",") for overlap in (False, True)]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model or "moeflow-tiny (bundled)", "device": args.device,
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
