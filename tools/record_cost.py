"""What the route record costs a resident decode step: the same engine with and without it, side by side.

    PYTHONPATH=. python3 tools/record_cost.py MODEL_DIR --corpus CORPUS_DIR --out RESULT.json

Every router writes its top-k straight into the record's buffers (routing/router.py, `out=`), which costs
nothing; what the record adds is `RouteRecord.stage` inside the step (the used-expert masks, the packing,
one device->host copy) and `RouteRecord.read` with the engine's accounting on the host after the token
sync. The "off" arm replaces both with no-ops (read hands back one routes object staged earlier) and
captures the decode graphs again without the staging; the "on" arm is the engine as it ships. Same prompts
(corpus test-split documents, 64 tokens), greedy, 64 output tokens, EOS ignored, at 100% (everything
resident), batch 1 and 32; the arms alternate over several rounds and each reports its best round.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from hooks_ab import corpus_prompts  # tools/, beside this script
    from moeflow import LLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    llm = LLM(args.model, expert_budget="100%", max_model_len=160, max_batch_size=32, device=args.device,
              dtype="bfloat16" if torch.cuda.is_available() else "float32")
    engine = llm.engine
    record = engine.model.record
    prompts = corpus_prompts(llm.tokenizer, args.corpus, 32)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    stage, read = record.stage, record.read
    held = {}

    def arm(on: bool) -> None:
        if on:
            record.stage, record.read = stage, read
        else:
            record.stage = lambda T, selected: None
            def held_read(T, selected, rows, real=None):
                if (T, real) not in held:
                    held[T, real] = read(T, selected, rows, real)
                return held[T, real]

            record.read = held_read
        engine.runner.graphs = None
        engine._capture_graphs()

    results = {}
    for batch in (1, 32):
        llm.generate(prompts[:batch], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        best = {True: 0.0, False: 0.0}
        tokens = {}
        for _ in range(args.rounds):
            for on in (True, False):
                arm(on)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                out = llm.generate(prompts[:batch], params)
                best[on] = max(best[on], out.stats.decode_tokens_per_s)
                tokens[on] = [o.outputs[0].token_ids for o in out]
        assert tokens[True] == tokens[False], "the record changes no token"
        results[batch] = {"with_record_tokens_per_s": best[True], "without_record_tokens_per_s": best[False],
                          "cost": 1 - best[True] / best[False]}
        print(json.dumps({"batch": batch, **results[batch]}), flush=True)
    arm(True)
    with open(args.out, "w") as f:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        json.dump({"model": args.model, "device": device, "torch": torch.__version__, "rounds": args.rounds,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
