"""A sequence: one request's prompt, generated tokens and where it stands."""

from __future__ import annotations

import enum

import numpy as np

from moeflow.outputs import RequestMetrics
from moeflow.routing.predictors.base import RequestHints
from moeflow.sampling import SamplingParams
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
        self.decode_waits: list[int] = []  # per decode step it took: steps it sat out since its previous token
        self.last_routes: np.ndarray | None = None  # [L, K] the experts its latest token ran, per MoE layer
        self.forced: list[int] | None = None  # teacher forcing: the output tokens it must take
        self.text = ""  # generated text, stop string excluded
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
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids
