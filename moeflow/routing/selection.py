"""Selectors: rewrite a batch's routing before the experts run.

The router's choice is the model's own; a selector may rewrite it for a batch (batch-aware expert
reduction), and only here. Exact steps run no selector at all, so the exact path never pays for one.

A selector runs inside decode CUDA graphs: it must not synchronise with the host or change shapes with
the data. What it may know of the batch is in its SelectionContext, as device tensors with static
addresses that the engine fills before each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeflow.routing.router import Routing


@dataclass(frozen=True)
class SelectionContext:
    """What a selector may know of the step. T tokens, E experts per layer.

    real: [T] bool, False for rows a CUDA graph pads its batch with (copies of the last real row), which a
    batch-level choice must not count. exact: [T] bool, rows whose request asked for exact routing: their
    picks must come out unchanged, and their experts count as kept. slot_table: [E] int32, the device slot
    of each of this layer's experts, -1 when not resident (None when every expert is resident).
    out: [T, K] (ids int64, weights) buffers a selector may write its choice into, each padding row taking
    the choice of the real row it copies; one that does returns them (None: none offered).
    scratch: [E] int32, zeros when the step starts, this layer's alone for the step (None: none offered): a
    selector that needs a zeroed buffer takes it here instead of zeroing one of its own inside every layer.
    """

    is_prefill: bool
    real: torch.Tensor
    exact: torch.Tensor
    slot_table: torch.Tensor | None = None
    out: tuple[torch.Tensor, torch.Tensor] | None = None
    scratch: torch.Tensor | None = None


class Selector(Protocol):
    name: str

    def select(self, layer: int, routing: Routing, ctx: SelectionContext) -> Routing:
        """The routing the experts of MoE layer `layer` (its decoder-layer index) run with."""
