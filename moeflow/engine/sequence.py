"""A sequence: one request's prompt, generated tokens and where it stands, and the outputs it streams."""

from __future__ import annotations

import enum

import numpy as np
import torch

from moeflow.outputs import CompletionOutput, RequestMetrics, RequestOutput
from moeflow.routing.predictors.base import RequestHints
from moeflow.sampling import SamplingParams, top_logprobs
from moeflow.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 arrival_time: float, detokenizer: IncrementalDetokenizer | None, seed: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.kv_row: int | None = None
        self.num_cached = 0  # tokens whose keys and values are in the KV cache
        self.detokenizer = detokenizer
        self.seed = seed  # the sampler's noise for this request is a function of (seed, token index) alone
        self.hints = RequestHints(params.task, params.ttft_slo_ms, params.tpot_slo_ms, params.priority)
        self.last_step = -1  # the engine step that last advanced it
        self.decode_mark = 0  # the engine's decode steps launched up to and including the one that last advanced it
        self.last_routes: np.ndarray | None = None  # [L, K] the experts its latest token ran, per MoE layer
        self.forced: list[int] | None = None  # teacher forcing: the output tokens it must take
        self.num_ahead = 0  # tokens of steps in flight, on the device, not yet taken (EngineConfig.async_scheduling)
        self.text = ""  # generated text, stop string excluded
        self.detokenized = 0  # output tokens `text` holds
        self.emitted_chars = 0  # how much of `text` earlier outputs have streamed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def context_len(self) -> int:
        """Tokens in its context once the steps in flight are taken: its next decode step's context."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_ahead

    def length_ends_ahead(self, max_model_len: int) -> bool:
        """Whether the tokens in flight already end it by length (known before their values are)."""
        n = len(self.output_ids) + self.num_ahead
        return (n >= self.params.max_tokens or self.context_len >= max_model_len
                or (self.forced is not None and n >= len(self.forced)))

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def launched(self, step: int, decode_steps: int, decode: bool, wall: float) -> None:
        """The engine launches step `step` with this sequence in it, after `decode_steps` decode steps; a decode
        step counts the decode steps it sat out since its last token (its prefill's or a decode step's)."""
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = wall
        if decode:
            waited = decode_steps - self.decode_mark
            self.metrics.decode_wait_steps += waited
            self.metrics.max_decode_wait_steps = max(self.metrics.max_decode_wait_steps, waited)
        self.last_step = step
        self.decode_mark = decode_steps + decode

    def append(self, token: int, now: float, eos_ids, max_model_len: int, detokenize: bool = True
               ) -> tuple[str, int | str | None] | None:
        """Take a generated token; (finish reason, stop reason) if it ends the sequence, else None. A stop
        string ends it too, and the text is cut at it. `detokenize=False` leaves the text to `detokenize()`,
        later, unless the request has stop strings: they need the text now to know whether it ended."""
        p = self.params
        self.output_ids.append(token)
        self.num_cached = self.num_tokens - 1
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        if detokenize or p.stop:
            self.detokenize()
        if token in p.stop_token_ids:
            return "stop", token
        if not p.ignore_eos and token in eos_ids:
            return "stop", None
        stop = self._cut_at_stop_string() if p.stop else None
        if stop is not None:
            return "stop", stop
        if (len(self.output_ids) >= p.max_tokens or self.num_tokens >= max_model_len
                or (self.forced is not None and len(self.output_ids) == len(self.forced))):
            return "length", None
        return None

    def detokenize(self) -> None:
        """Bring the text up to the tokens taken so far (a stop string's cut is final: nothing follows it)."""
        if self.detokenizer is None or self.detokenized == len(self.output_ids):
            return
        for token in self.output_ids[self.detokenized:]:
            self.detokenizer.add(token)
        self.detokenized = len(self.output_ids)
        self.text = self.detokenizer.text

    def record_logprobs(self, last: torch.Tensor, token: torch.Tensor, prompt: torch.Tensor | None) -> None:
        """The logprobs it asked for: of the sampled token (last [1, V], token [1]), and, after its prefill, of
        each prompt token (prompt [n, V], the logits at every prompt position)."""
        if self.params.logprobs is not None:
            self.logprobs.extend(top_logprobs(last, token, self.params.logprobs))
        if prompt is not None:
            nxt = torch.tensor(self.prompt_ids[1:], device=prompt.device)
            self.prompt_logprobs = [None, *top_logprobs(prompt[:-1], nxt, self.params.prompt_logprobs)]

    def _cut_at_stop_string(self) -> str | None:
        for stop in self.params.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[: at + len(stop)] if self.params.include_stop_str_in_output else self.text[:at]
                return stop
        return None

    def output(self) -> RequestOutput:
        """What it has made so far; while running, a tail that could still grow into a stop string is held back."""
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        visible = len(self.text) if self.finished else max(self.emitted_chars, len(self.text) - hold)
        new_text = self.text[self.emitted_chars : visible]
        self.emitted_chars = visible
        completion = CompletionOutput(
            index=0, text=self.text[:visible], token_ids=list(self.output_ids), finish_reason=self.finish_reason,
            stop_reason=self.stop_reason, logprobs=self.logprobs, new_text=new_text,
            new_token_ids=self.output_ids[-1:],
        )
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [completion], self.finished, self.metrics,
                             self.prompt_logprobs)
