"""First come, first served: admit waiting sequences in arrival order as soon as a KV row and the step's
prompt-token budget allow (a prefill wins the step), else decode the running sequences, taking the ones
that have waited longest since their last token when more are running than one step takes."""

from __future__ import annotations

from moeflow.engine.scheduler import SchedulerContext, StepPlan
from moeflow.engine.sequence import Sequence
from moeflow.routing.predictors.base import StepView
from moeflow.routing.record import StepRoutes


def admit_in_order(waiting: list[Sequence], ctx: SchedulerContext) -> list[Sequence]:
    """The longest prefix of `waiting` that free KV rows and the prompt-token budget take (at least one
    sequence when a row is free, however long its prompt)."""
    admitted, tokens = [], 0
    for seq in waiting:
        n = len(seq.prompt_ids)
        if len(admitted) >= ctx.free_kv_rows or (admitted and tokens + n > ctx.max_num_batched_tokens):
            break
        admitted.append(seq)
        tokens += n
    return admitted


def longest_waiting(running: list[Sequence], n: int) -> list[Sequence]:
    """The n running sequences whose last token is oldest (all of them when n covers them), in running order."""
    if len(running) <= n:
        return list(running)
    chosen = {id(s) for s in sorted(running, key=lambda s: s.last_step)[:n]}
    return [s for s in running if id(s) in chosen]


class FCFSPolicy:
    name = "fcfs"
    reads_routes = False  # plans from arrival and wait alone: the engine may plan a step before the last settles

    def plan(self, waiting: list[Sequence], running: list[Sequence], ctx: SchedulerContext) -> StepPlan:
        admitted = admit_in_order(waiting, ctx)
        if admitted:
            return StepPlan(admit=admitted)
        return StepPlan(decode=longest_waiting(running, ctx.max_batch_size))

    def update(self, step: StepView, routes: StepRoutes) -> None:
        return None
