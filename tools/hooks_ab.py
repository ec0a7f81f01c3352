"""Decode tokens/s with and without observing predictors, on this tree or an older one (the same script).

    PYTHONPATH=TREE python3 tools/hooks_ab.py MODEL_DIR --corpus CORPUS_DIR --out RESULT.json

Run once with this checkout and once with a checkout from before the route record (where an observing
predictor turned decode eager) to set the two side by side: same model, same prompts (corpus test-split
documents, 64 tokens each), greedy, 64 output tokens, EOS ignored, budgets 100% and 25%, batch 1 and 32,
predictors none / previous / frequency. The older tree has no built-in predictors; this script gives it
equivalents written to its interface (predict(batch) -> {layer: scores}, observe(layer, topk_ids)).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


class OldPrevious:
    """'previous' for the older interface: the experts each layer used in the last step."""

    observes_routes = True

    def __init__(self, spec):
        self.spec, self.last = spec, {}

    def predict(self, batch):
        if not self.last:
            return None
        out = {}
        for layer, used in self.last.items():
            s = torch.zeros(self.spec.num_experts)
            s[used] = 1.0
            out[layer] = s
        return out

    def observe(self, layer, topk_ids):
        self.last[layer] = torch.unique(topk_ids).cpu()


class OldFrequency(OldPrevious):
    def predict(self, batch):
        return {l: c.clone() for l, c in self.last.items()} or None

    def observe(self, layer, topk_ids):
        c = self.last.setdefault(layer, torch.zeros(self.spec.num_experts))
        c.mul_(0.9).index_add_(0, topk_ids.flatten().cpu(), torch.ones(topk_ids.numel()))


def predictor(name, engine):
    try:
        from moeflow.routing.predictors import make_predictor
    except ImportError:  # the older tree: its set_predictor takes its own NoPredictor, not None
        from moeflow.routing.predictors import NoPredictor

        return {"none": NoPredictor, "previous": OldPrevious, "frequency": OldFrequency}[name](
            *(() if name == "none" else (engine.spec,)))
    return None if name == "none" else make_predictor(name, engine.spec)


def corpus_prompts(tokenizer, corpus: str, n: int, length: int = 64) -> list[list[int]]:
    """The first `length` tokens of the first `n` test-split documents that have that many."""
    from moeflow.data.corpus import iter_split

    prompts = []
    for doc in iter_split(corpus, "test", None):
        ids = tokenizer.encode(doc.text)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"the test split has only {len(prompts)} documents of {length} tokens or more")


def main() -> None:
    from moeflow import LLM, SamplingParams
    from moeflow.config import CacheConfig, ExpertBudget

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--label", default="this tree")
    args = p.parse_args()
    llm = LLM(args.model, expert_budget="100%", max_model_len=160, max_batch_size=32,
              dtype="bfloat16" if torch.cuda.is_available() else "float32")
    engine = llm.engine
    prompts = corpus_prompts(llm.tokenizer, args.corpus, 64)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    rows = []
    for budget in ("100%", "25%"):
        for name in ("none", "previous", "frequency"):
            for batch in (1, 32):
                engine.set_predictor(predictor(name, engine))
                engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
                llm.generate(prompts[32:32 + batch], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
                engine.reset_expert_cache(CacheConfig(budget=ExpertBudget.parse(budget)))
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = llm.generate(prompts[:batch], params)
                wall = time.perf_counter() - t
                s = out.stats
                graphs = engine.runner.graphs is not None
                rows.append({"tree": args.label, "budget": budget, "predictor": name, "batch": batch,
                             "decode_tokens_per_s": s.decode_tokens_per_s, "wall_s": wall, "graphs": graphs,
                             "hit_rate": s.hit_rate})
                print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
