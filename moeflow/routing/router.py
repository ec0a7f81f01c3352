"""Router: gate logits -> (topk_ids, topk_weights), exactly as each family defines it.

Shapes: T tokens, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.architectures.spec import RouterSpec


@dataclass(frozen=True, slots=True)
class Routing:
    ids: torch.Tensor  # [T, K] int64, expert per (token, pick)
    weights: torch.Tensor  # [T, K] float32, or the model dtype where the family casts back
    logits: torch.Tensor  # [T, E] in the model dtype


def route(logits: torch.Tensor, spec: RouterSpec,
          out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Routing:
    """`out`: (ids [T, K] int64, weights [T, K], float32 scratch [T, K]) to write into, such as a RouteRecord's
    rows: the top-k lands there directly, so recording the routes costs no copy."""
    probs = torch.softmax(logits.float(), dim=-1)
    if out is None:
        weights, ids = torch.topk(probs, spec.top_k, dim=-1)
        if spec.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if spec.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        return Routing(ids, weights, logits)
    ids, weights_out, scratch = out
    values = weights_out if weights_out.dtype == torch.float32 else scratch
    torch.topk(probs, spec.top_k, dim=-1, out=(values, ids))
    if spec.normalize:
        values.div_(values.sum(dim=-1, keepdim=True))
    if values is not weights_out:
        weights_out.copy_(values)
    return Routing(ids, weights_out, logits)
