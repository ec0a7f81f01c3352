"""The engine's logprobs ({token_id: logprob} per position) in OpenAI's two formats.

Legacy completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({token text:
logprob}, the chosen token plus the top n, as OpenAI and vLLM return), `text_offset`. This is
what lm-evaluation-harness reads: with echo, position 0 (the first prompt token, which has no
context) is None in both `token_logprobs` and `top_logprobs`.
Chat: a list of {token, logprob, bytes, top_logprobs: [the top n]}.
"""

from __future__ import annotations

from moeflow.server.protocol import ChatLogprob, CompletionLogprobs, TopLogprob
from moeflow.tokenizer import Tokenizer

FLOOR = -9999.0  # what OpenAI sends for -inf, which JSON cannot carry

Entry = dict[int, float] | None


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_texts(tokenizer: Tokenizer, token_ids: list[int]) -> list[str]:
    """token_text of each id, each distinct id decoded once: a long prompt repeats its vocabulary many times over,
    and a decode call per id held the GIL long enough (1 MiB of text, ~370,000 calls) to stall the engine thread."""
    text = {t: token_text(tokenizer, t) for t in set(token_ids)}
    return [text[t] for t in token_ids]


def _lp(x: float) -> float:
    return max(x, FLOOR)


class CompletionLogprobsBuilder:
    """Builds legacy-completions logprobs; `text_offset` continues across calls, for streaming."""

    def __init__(self, tokenizer: Tokenizer, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset

    def build(self, token_ids: list[int], entries: list[Entry]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            text = token_text(self.tokenizer, token_id)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_lp(entry[token_id]))
            top: dict[str, float] = {}
            for tid, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
                top.setdefault(token_text(self.tokenizer, tid), _lp(lp))  # two ids, one text: keep the likelier
            out.top_logprobs.append(top)
        return out


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[Entry], num: int) -> list[ChatLogprob]:
    out = []
    for token_id, entry in zip(token_ids, entries):
        text = token_text(tokenizer, token_id)
        top = [_top(tokenizer, tid, lp) for tid, lp in sorted(entry.items(), key=lambda kv: -kv[1])[:num]]
        out.append(ChatLogprob(token=text, logprob=_lp(entry[token_id]), bytes=list(text.encode()), top_logprobs=top))
    return out


def _top(tokenizer: Tokenizer, token_id: int, lp: float) -> TopLogprob:
    text = token_text(tokenizer, token_id)
    return TopLogprob(token=text, logprob=_lp(lp), bytes=list(text.encode()))
