"""A step launched on the device and not yet settled by the host, and when the next step may be launched first.

With `EngineConfig.async_scheduling` (by default on CUDA) the engine plans and launches step N+1 before it
settles step N: a decode step's input tokens are read on the device (ModelRunner.last_tokens), and the host
takes step N's tokens, routes and outputs while the device runs N+1, so the device does not wait for the host
between steps. Settling N then reads host copies started when N was launched (its tokens, a
RouteRecord.snapshot of its routes, an event after them), since N+1 overwrites the device buffers they came
from.

A step runs ahead only where nothing that plans the next one reads its routes or tokens on the host
(`async_blocker`: every expert resident, no predictor, a policy whose `reads_routes` is False) and no request in
it asked for logprobs (read from the step's logits, which the next step overwrites). A sequence that the step in
flight ends by length is not scheduled again; one that a stop token, a stop string or EOS ends there runs one
step more, whose token is void (neither kept nor counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.engine.model_runner import StepLogits
from moeflow.engine.scheduler import ScheduledBatch
from moeflow.routing.predictors import StepView
from moeflow.routing.record import RouteRecord, StepRoutes


@dataclass
class LaunchedStep:
    """A step launched on the device, its tokens sampled there and not yet taken by the host."""

    batch: ScheduledBatch
    index: int
    view: StepView | None  # as the predictor saw its inputs at launch (None without one: built when settled)
    logits: StepLogits
    tokens: torch.Tensor  # [B] on the device
    t0: float  # perf_counter when its launch began
    # when the next step may be launched before this one is settled: host copies of its tokens and routes,
    # started at launch, and (CUDA) the event after them
    host_tokens: torch.Tensor | None = None
    host_routes: torch.Tensor | None = None
    done: torch.cuda.Event | None = None

    @property
    def ahead(self) -> bool:
        """Whether the next step may be launched before this one is settled."""
        return self.host_tokens is not None

    def copy_for_later(self, record: RouteRecord) -> None:
        """Start the host copies that settling reads once the next step is launched (on the current stream)."""
        pin = self.tokens.is_cuda
        self.host_tokens = torch.empty(len(self.tokens), dtype=torch.int64, pin_memory=pin)
        self.host_tokens.copy_(self.tokens, non_blocking=True)
        self.host_routes = record.snapshot(self.logits.num_tokens, self.logits.selected)
        if pin:
            self.done = torch.cuda.Event()
            self.done.record()

    def token_list(self) -> list[int]:
        """Its tokens on the host: the step's one device->host sync (for a step launched ahead, a wait for its
        own copies only, while the step launched after it runs on)."""
        if not self.ahead:
            return self.tokens.tolist()
        if self.done is not None:
            self.done.synchronize()
        return self.host_tokens.tolist()

    def routes(self, record: RouteRecord) -> StepRoutes:
        """Its routes, read after `token_list`."""
        lg = self.logits
        return record.read(lg.num_tokens, lg.selected, lg.rows, real=lg.rows[-1].stop, host=self.host_routes)


def async_blocker(fully_resident: bool, predictor, policy) -> str | None:
    """Why no step can be launched ahead of the last one's settling with this set-up (None: steps can, unless
    one asks for logprobs)."""
    if not fully_resident:
        return "an offloaded expert pool plans each step's copies from the last step's routes"
    if predictor is not None:
        return "the predictor forecasts each step from the last step's routes"
    if getattr(policy, "reads_routes", True):
        return f"scheduling policy {policy.name!r} chooses from the last step's routes"
    return None


def reads_logits(batch: ScheduledBatch) -> bool:
    """Whether a request in the batch reads the step's logits on the host (logprobs, prompt logprobs)."""
    return any(s.params.logprobs is not None or s.params.prompt_logprobs is not None for s in batch.seqs)
