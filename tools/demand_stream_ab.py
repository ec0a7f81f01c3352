"""Demand misses on their own copy stream against one stream for every copy, LRU and the predictive cache, on the
text workload.

    PYTHONPATH=. python3 tools/demand_stream_ab.py MODEL_DIR --predictor PRED_DIR --corpus CORPUS_DIR --out RESULT.json
        [--budgets 25%,10%] [--batch-sizes 1,8] [--rounds 2]

Four arms on one engine per budget and batch size, the same requests (the text workload: corpus test-split prompts
of 64-256 tokens, temperature 0.8, top_p 0.95, a seed per request, 64 output tokens, EOS ignored): LRU and the
learned predictor with ExpertFlow's planner, each with `TransferEngine.separate_demand` off (every copy on one
stream, in issue order: a demand miss waits behind the prefetches issued before it) and on (the default). The
arms alternate within each round; each reports its best round's decode tokens/s, with MB moved per output token
and the compute stream's stall share. The script asserts that every arm gives the same tokens and that the two
stream settings move the same bytes (they change when copies run, never which).
"""

from __future__ import annotations

import json


def main() -> None:
    from moeflow.bench.runs import alternate, arm_columns, text_tool_engine, text_tool_parser, write_ab
    from moeflow.config import CacheConfig, ExpertBudget

    p = text_tool_parser(__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="25%,10%")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    llm, workload, batches, lru, pred = text_tool_engine(args)
    engine = llm.engine  # on a CPU the two stream settings are the same code: a dry run of the tool
    arms = {"lru-one": (lru, False), "lru-two": (lru, True), "pred-one": (pred, False), "pred-two": (pred, True)}

    def streams(budget: str, separate: bool):
        def setup() -> None:
            # a pool of this budget first (a new size makes a new cache), then the setting on it: the run empties
            # this pool in place and keeps its transfer engine
            engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
            engine.cache.transfer.separate_demand = separate
        return setup

    results = []
    for budget in args.budgets.split(","):
        for batch in batches:
            timed = [workload.requests(0, batch)]
            warm = workload.requests(batch, batch)
            runs, last = alternate(engine, {name: (conf, streams(budget, separate)) for name, (conf, separate)
                                            in arms.items()}, budget, timed, warm, args.rounds,
                                   {"budget": budget, "batch": batch})
            assert len({tuple(map(tuple, r.outputs)) for r in last.values()}) == 1, "the model's own tokens"
            for kind in ("lru", "pred"):
                assert last[f"{kind}-one"].bytes_moved == last[f"{kind}-two"].bytes_moved, "same copies"
            best = {name: max(v) for name, v in runs.items()}
            row = {"budget": budget, "batch": batch, **arm_columns(runs, last),
                   "lru_two_over_one": best["lru-two"] / best["lru-one"],
                   "pred_two_over_one": best["pred-two"] / best["pred-one"],
                   "pred_two_over_lru_two": best["pred-two"] / best["lru-two"]}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    engine.cache.transfer.separate_demand = True
    write_ab(args.out, engine, workload, args.rounds, results, model=args.model, predictor=args.predictor)


if __name__ == "__main__":
    main()
