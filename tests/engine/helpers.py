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
