"""SamplingParams (validated when made) and the Sampler that turns logits into tokens.

Names and defaults follow vLLM's SamplingParams, so code written for it reads the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moeflow.errors import ConfigError

MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top-n logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None  # same for every prompt token after the first
    # request hints and routing mode (placeholder fields until the batched sampler lands)
    task: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    priority: int = 0
    routing: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_int("max_tokens", self.max_tokens, lo=1)
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, lo=-1)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**63 - 1)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entries", t, lo=0)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0, hi=MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")


class Sampler:
    """Samples one token per row of a [B, V] float32 logits tensor (placeholder for the batched sampler)."""

    def __init__(self, vocab_size: int, num_rows: int, device: torch.device):
        self.device = device

    def admit(self, row: int, prompt_ids: list[int], params: SamplingParams) -> None:
        return None

    def sample(self, logits: torch.Tensor, rows: list[int], params: list[SamplingParams], seeds: list[int],
               steps: list[int]) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            out[idx] = logits[idx].argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.greedy:
                g = torch.Generator(logits.device).manual_seed((seeds[i] * 1_000_003 + steps[i]) % (2**63))
                out[i] = torch.multinomial(self._probs(logits[i], p), 1, generator=g)[0]
        return out

    @staticmethod
    def _probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return torch.softmax(logits, dim=-1)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> list[dict[int, float]]:
    """Per row: {token: logprob} for the chosen token and the n most likely ones."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(-1, chosen[:, None])[:, 0].tolist()
    top_v, top_i = (torch.topk(logp, n, dim=-1) if n > 0 else (logp[:, :0], chosen[:, None][:, :0]))
    out = []
    for row, (c, lp) in enumerate(zip(chosen.tolist(), chosen_lp)):
        d = dict(zip(top_i[row].tolist(), top_v[row].tolist()))
        d[c] = lp
        out.append(d)
    return out
