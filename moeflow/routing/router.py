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


def route(logits: torch.Tensor, spec: RouterSpec) -> Routing:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.weights_in_model_dtype:
        weights = weights.to(logits.dtype)
    return Routing(ids, weights, logits)
