"""Scheduler: picks each step's batch from the waiting and running sequences.

A step is either a prefill (new sequences join: their whole prompts run at once) or a
decode (every running sequence advances one token). Waiting sequences are admitted as
soon as a KV row and the step's token budget allow, so new requests join while others
decode, and finished ones leave at once. Which waiting sequences go first is the policy's
call; the scheduler never touches the expert cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from moeflow.engine.kv_cache import KVCache
from moeflow.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(len(s.prompt_ids) for s in self.seqs) if self.is_prefill else len(self.seqs)


class SchedulingPolicy(Protocol):
    def order_waiting(self, waiting: deque[Sequence]) -> list[Sequence]:
        """Waiting sequences in the order they should be admitted."""


class FCFSPolicy:
    def order_waiting(self, waiting: deque[Sequence]) -> list[Sequence]:
        return list(waiting)


POLICIES = {"fcfs": FCFSPolicy}


class Scheduler:
    def __init__(self, kv: KVCache, max_num_batched_tokens: int, policy: SchedulingPolicy):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        admitted, tokens = [], 0
        for seq in self.policy.order_waiting(self.waiting):
            n = len(seq.prompt_ids)
            if not self.kv.can_allocate() or (admitted and tokens + n > self.max_num_batched_tokens):
                break
            seq.kv_row = self.kv.allocate()
            seq.status = Status.RUNNING
            admitted.append(seq)
            tokens += n
        if admitted:
            for seq in admitted:
                self.waiting.remove(seq)
            self.running.extend(admitted)
            return ScheduledBatch(admitted, is_prefill=True)
        if self.running:
            return ScheduledBatch(list(self.running), is_prefill=False)
        return None

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
