"""Scheduler: asks its policy for each step's batch, checks the answer, and applies it.

A step is either a prefill (new sequences join: their whole prompts run at once) or a
decode (running sequences advance one token each). The policy plans every step: which
waiting sequences are admitted now, or which running ones decode (all of them, or a subset
of at most `max_batch_size`). It sees the engine's state through a SchedulerContext (free KV
rows, what the expert cache holds, each request's last routes and predicted next routes,
request hints on the sequences, measured costs), and after each step `update` shows it the
step's routes. The scheduler owns the KV rows and the waiting/running lists; a policy only
chooses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moeflow.engine.kv_cache import KVCache
from moeflow.engine.sequence import Sequence, Status
from moeflow.routing.predictors.base import StepView
from moeflow.routing.record import StepRoutes


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(len(s.prompt_ids) for s in self.seqs) if self.is_prefill else len(self.seqs)

    def view(self, index: int) -> StepView:
        """What a predictor sees of this batch as step `index`: each sequence's tokens the step feeds and lengths."""
        seqs = self.seqs
        if self.is_prefill:
            inputs = tuple(tuple(s.prompt_ids) for s in seqs)
            lens = tuple(len(s.prompt_ids) for s in seqs)
        else:
            inputs = tuple((s.last_token,) for s in seqs)
            lens = tuple(s.num_tokens for s in seqs)
        return StepView(index, self.is_prefill, tuple(s.request_id for s in seqs), inputs, lens)


@dataclass
class MeasuredCosts:
    """What the engine has measured so far (None: not yet)."""

    prefill_s_per_token: float | None = None
    decode_step_s: dict[int, float] = field(default_factory=dict)  # by batch size
    expert_bytes: int = 0
    load_bytes_per_s: float | None = None  # host->device bandwidth the expert copies achieved

    def observe(self, is_prefill: bool, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` (a decode step: one per sequence) took `seconds`: moving averages, 0.2 new."""
        if is_prefill:
            per_token, p = seconds / num_tokens, self.prefill_s_per_token
            self.prefill_s_per_token = per_token if p is None else 0.8 * p + 0.2 * per_token
        else:
            d = self.decode_step_s.get(num_tokens)
            self.decode_step_s[num_tokens] = seconds if d is None else 0.8 * d + 0.2 * seconds


class RequestRows(Mapping[str, np.ndarray]):
    """request id -> its row of one array [N, ...], the rows made at once (a predictor scoring every running
    sequence), kept as that array: a policy takes the rows of many requests in one indexing (`rows`)."""

    __slots__ = ("array", "_index")

    def __init__(self, request_ids: list[str], array: np.ndarray):
        if len(request_ids) != len(array):
            raise ValueError(f"{len(request_ids)} request ids for {len(array)} rows")
        self.array = array
        self._index = {r: i for i, r in enumerate(request_ids)}

    def __getitem__(self, request_id: str) -> np.ndarray:
        return self.array[self._index[request_id]]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def rows(self, request_ids: list[str]) -> np.ndarray:
        """The rows of `request_ids`, in that order, as one new array."""
        return self.array[[self._index[r] for r in request_ids]]


@dataclass
class SchedulerContext:
    """One step's view for the policy. L MoE layers, E experts, K top-k.

    residency [L, E] bool: experts on the device or on their way (None: every expert is resident).
    signatures: request id -> [L, K] the experts its latest token ran, per layer (absent before its first step;
        empty for a policy whose reads_routes is False).
    predictions: request id -> [L, E] a predictor's scores for its next token (absent without a predictor); the
        engine's is a RequestRows, whose `rows` takes many at once.
    """

    step: int
    free_kv_rows: int
    max_num_batched_tokens: int
    max_batch_size: int
    residency: np.ndarray | None
    signatures: dict[str, np.ndarray]
    predictions: Mapping[str, np.ndarray]
    costs: MeasuredCosts


@dataclass
class StepPlan:
    admit: list[Sequence] = field(default_factory=list)  # waiting sequences to prefill now
    decode: list[Sequence] = field(default_factory=list)  # running sequences to decode (when none is admitted)


class SchedulingPolicy(Protocol):
    name: str

    def plan(self, waiting: list[Sequence], running: list[Sequence], ctx: SchedulerContext) -> StepPlan:
        """The next step: sequences to admit (a prefill), or else the running ones to decode."""

    def update(self, step: StepView, routes: StepRoutes) -> None:
        """The step that ran, and its routes."""


class Scheduler:
    def __init__(self, kv: KVCache, max_num_batched_tokens: int, max_batch_size: int, policy: SchedulingPolicy):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_batch_size = max_batch_size
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ctx: SchedulerContext, decodable: list[Sequence] | None = None) -> ScheduledBatch | None:
        """The next step's batch (None: nothing to run). `decodable`: the running sequences the policy is offered
        (default all; the engine leaves out those the step in flight ends)."""
        if not self.has_unfinished():
            return None
        plan = self.policy.plan(list(self.waiting), list(self.running if decodable is None else decodable), ctx)
        self._check(plan)
        if plan.admit:
            for seq in plan.admit:
                seq.kv_row = self.kv.allocate()
                seq.status = Status.RUNNING
                self.waiting.remove(seq)
            self.running.extend(plan.admit)
            return ScheduledBatch(list(plan.admit), is_prefill=True)
        return ScheduledBatch(list(plan.decode), is_prefill=False)

    def _check(self, plan: StepPlan) -> None:
        """A policy's plan must be one the engine can run, and must make progress."""
        name = self.policy.name
        if plan.admit:
            if plan.decode:
                raise RuntimeError(f"scheduling policy {name!r} planned a prefill and a decode in one step")
            if len(plan.admit) > self.kv.num_free:
                raise RuntimeError(f"scheduling policy {name!r} admitted {len(plan.admit)} sequences with "
                                   f"{self.kv.num_free} KV rows free")
            if len({id(s) for s in plan.admit}) != len(plan.admit) or any(s.status is not Status.WAITING
                                                                          for s in plan.admit):
                raise RuntimeError(f"scheduling policy {name!r} admitted a sequence that is not waiting")
            tokens = sum(len(s.prompt_ids) for s in plan.admit)
            if len(plan.admit) > 1 and tokens > self.max_num_batched_tokens:
                raise RuntimeError(f"scheduling policy {name!r} admitted {tokens} prompt tokens, over "
                                   f"max_num_batched_tokens={self.max_num_batched_tokens}")
            return
        if not plan.decode:
            if self.running or self.kv.num_free:
                raise RuntimeError(f"scheduling policy {name!r} planned an empty step with work to do")
            raise RuntimeError("every KV row is taken and nothing is running")
        if len(plan.decode) > self.max_batch_size:
            raise RuntimeError(f"scheduling policy {name!r} decodes {len(plan.decode)} sequences in one step, "
                               f"over max_batch_size={self.max_batch_size}")
        running = {id(s) for s in self.running}
        if len({id(s) for s in plan.decode}) != len(plan.decode) or any(id(s) not in running for s in plan.decode):
            raise RuntimeError(f"scheduling policy {name!r} decodes a sequence that is not running")

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the schedule and give its KV row back."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        if seq.kv_row is not None:
            self.kv.free(seq.kv_row)
            seq.kv_row = None
        seq.status = Status.FINISHED
