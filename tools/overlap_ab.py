"""The predictive cache's correction heard late against heard at once, beside LRU, on the text workload.

    PYTHONPATH=. python3 tools/overlap_ab.py MODEL_DIR --predictor PRED_DIR --corpus CORPUS_DIR --out RESULT.json
        [--budgets 25%,10%] [--batch-sizes 1,8] [--rounds 3]

Three arms on one engine per budget, the same requests (the text workload: corpus test-split prompts of
64-256 tokens, temperature 0.8, top_p 0.95, a seed per request, 64 output tokens, EOS ignored):

- `lru`: no predictor; experts load on demand, least recently used out first;
- `now`: the learned predictor and ExpertFlow's planner, the route listener called as soon as a layer's
  experts are enqueued (`CachedExperts.defer_listener = False`): the device waits while the host corrects;
- `late`: the same, the listener called once the next stretch of the model is enqueued too (the default),
  so the correction runs while the device computes.

The arms alternate within each round and each reports its best round's decode tokens/s, with MB moved per
output token and the host time of the predictor and planner as a share of decode time. The script asserts
that all three arms give the same tokens and that `now` and `late` move the same bytes (the deferral changes
when the host plans, never what the cache does).
"""

from __future__ import annotations

import json


def main() -> None:
    from moeflow.bench.runs import alternate, arm_columns, text_tool_engine, text_tool_parser, write_ab

    p = text_tool_parser(__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="25%,10%")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    llm, workload, batches, lru, pred = text_tool_engine(args)
    engine = llm.engine
    confs = {"lru": lru, "now": pred, "late": pred}
    results = []
    for budget in args.budgets.split(","):
        for batch in batches:
            timed = [workload.requests(0, batch)]
            warm = workload.requests(batch, batch)
            arms = {name: (conf, lambda late=name != "now": setattr(engine.model.experts, "defer_listener", late))
                    for name, conf in confs.items()}
            runs, last = alternate(engine, arms, budget, timed, warm, args.rounds, {"budget": budget, "batch": batch})
            assert last["now"].outputs == last["late"].outputs == last["lru"].outputs, "the model's own tokens"
            assert last["now"].bytes_moved == last["late"].bytes_moved, "the deferral moves the same bytes"
            best = {name: max(v) for name, v in runs.items()}
            row = {"budget": budget, "batch": batch, **arm_columns(runs, last),
                   "late_over_now": best["late"] / best["now"], "late_over_lru": best["late"] / best["lru"],
                   "now_over_lru": best["now"] / best["lru"]}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    engine.model.experts.defer_listener = True
    write_ab(args.out, engine, workload, args.rounds, results, model=args.model, predictor=args.predictor)


if __name__ == "__main__":
    main()
