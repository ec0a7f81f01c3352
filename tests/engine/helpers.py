"""Test helpers: run moeflow and transformers side by side on the same checkpoint."""

from __future__ import annotations

import torch

from moeflow import LLM, SamplingParams


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class LogitsRecorder:
    """Keeps the logits that chose every sampled token, per request id, in step order."""

    def __init__(self, llm: LLM):
        self.by_request: dict[str, list[torch.Tensor]] = {}
        runner = llm.engine.runner
        original = runner.run

        def run(batch, *args, **kwargs):
            out = original(batch, *args, **kwargs)
            for i, seq in enumerate(batch.seqs):
                self.by_request.setdefault(seq.request_id, []).append(out.last[i].detach().cpu().clone())
            return out

        runner.run = run

    def steps(self, request_index: int = 0) -> list[torch.Tensor]:
        return list(self.by_request.values())[request_index]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def hf_greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own greedy generate: the tokens and the logits of every step."""
    import transformers as tf

    ids = torch.tensor([prompt_ids])
    cfg = tf.GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=None,
                              output_logits=True, return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out.sequences[0, len(prompt_ids):].tolist(), [l[0] for l in out.logits]


class RandomPrefetcher:
    """A blind predictor: random scores every step, and it never looks at a route."""

    name = "random"

    def __init__(self, num_layers: int, num_experts: int, seed: int = 0):
        import numpy as np

        self.rng, self.shape = np.random.default_rng(seed), (num_layers, num_experts)

    def admitted(self, request):
        pass

    def finished(self, request_id):
        pass

    def predict(self, step):
        from moeflow.routing.predictors import Prediction

        return Prediction(self.rng.random(self.shape).astype("float32"))

    def observe(self, step, routes):
        pass


def grid_predictors(spec, learned=None):
    """The predictors the exactness grid runs: none, the two built-ins, a blind one, and `learned()` if given."""
    from moeflow.routing.predictors import make_predictor

    grid = {"none": lambda: None, "previous": lambda: make_predictor("previous", spec),
            "frequency": lambda: make_predictor("frequency", spec),
            "random": lambda: RandomPrefetcher(spec.num_moe_layers, spec.num_experts)}
    if learned is not None:
        grid["learned"] = learned
    return grid


def heldout_prompts(tokenizer, n: int, lengths=(5, 9, 14, 7, 11, 6, 16, 8)) -> list[list[int]]:
    """n prompts of real text (the committed held-out documents, domains in turn), of varied lengths."""
    import itertools
    import json
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "data" / "heldout").glob("*.jsonl"))
    docs = [[json.loads(l)["text"] for l in f.read_text().splitlines() if l.strip()] for f in files]
    texts = [t for t in itertools.chain.from_iterable(zip(*docs))][:n]
    return [tokenizer.encode(t)[: lengths[i % len(lengths)]] for i, t in enumerate(texts)]


def run_grid_cell(llm, prompts, steps: int):
    """Greedy tokens and each token's logprob, per prompt."""
    out = llm.generate(prompts, greedy(steps, logprobs=0))
    return [(o.outputs[0].token_ids, [d[t] for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in out], out.stats
