"""Finite weights: one NaN or Inf in a checkpoint turns every output it touches into NaN.

The check is one aminmax pass over the tensor (NaN propagates through both reductions, and
±Inf is its own min or max), at memory speed and without a temporary the size of the tensor;
only a tensor that fails is searched again for the first bad element, to say where it is.
"""

from __future__ import annotations

import math

import torch

from moeflow.errors import CheckpointError

ALLOW_HINT = "load it anyway with --allow-nonfinite-weights (allow_nonfinite_weights=True)"


def first_nonfinite(t: torch.Tensor) -> tuple[tuple[int, ...], str] | None:
    """(index, "NaN" | "+Inf" | "-Inf") of the first non-finite element of `t`, or None when all are finite."""
    if t.numel() == 0 or not t.is_floating_point():
        return None
    lo, hi = torch.aminmax(t)
    if math.isfinite(lo.item()) and math.isfinite(hi.item()):
        return None
    index = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
    value = t[index].item()
    return index, "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def nonfinite_error(what: str, t: torch.Tensor, found: tuple[tuple[int, ...], str], note: str = "") -> CheckpointError:
    index, kind = found
    count = int((~torch.isfinite(t)).sum())
    where = ", ".join(map(str, index))
    return CheckpointError(f"{what} holds {count} non-finite value{'s' if count > 1 else ''} (the first: {kind} at "
                           f"[{where}]){note}; the checkpoint is corrupt or was saved from a diverged run: refusing "
                           f"it, as its outputs would be NaN or silently wrong ({ALLOW_HINT})")


def check_finite(what: str, t: torch.Tensor) -> None:
    if (found := first_nonfinite(t)) is not None:
        raise nonfinite_error(what, t, found)
