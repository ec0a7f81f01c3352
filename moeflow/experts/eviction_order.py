"""What a planner tells the expert cache about which experts to keep (ExpertCache.order).

Shapes: L MoE layers (by ordinal), E experts per layer, S slots.

- quotas: each layer's slot target; a layer under its quota takes slots back from the layers most over theirs.
- by value (`share_by_value`): instead of quotas, a slot any layer needs comes from the least valuable evictable
  expert of any layer above `floor` slots (quotas.least_valuable); a prefetch takes one only below `margin` times
  its own score.
- protection: experts eviction spares while anything else can go (those predicted for this step).
- priorities: higher keeps longer; among equals the eviction policy decides.
- after use (rounds by value): each expert's priority once its layer has computed it this step. A layer whose
  next load would evict an expert worth more than one it already holds, valued so, ends a round there: it computes
  what it holds, which then goes first (`spend`), as Belady's rule seeing a layer-step's experts one by one would.

The cache reads this state whenever it needs a slot; it never changes what is computed.
"""

from __future__ import annotations

import numpy as np

from moeflow.experts.quotas import equal_quotas


class EvictionOrder:
    def __init__(self, num_layers: int, num_experts: int, num_slots: int):
        self.num_layers, self.num_slots = num_layers, num_slots
        self.quota = equal_quotas(num_slots, num_layers)
        self.floor: int | None = None  # share_by_value's floor; None: slots are shared by quota
        self.margin = 0.0
        self.protected = np.zeros((num_layers, num_experts), dtype=bool)
        self.unprotected = ~self.protected
        self.priority: np.ndarray | None = None  # [L, E]; None: the eviction policy's order alone
        self.after_use: np.ndarray | None = None  # [L, E] priorities once computed this step; None: no rounds
        self.min_round = 1  # rounds by value: the fewest experts a round computes before it may end

    @property
    def by_value(self) -> bool:
        return self.floor is not None and self.priority is not None

    def set_quotas(self, quotas: np.ndarray) -> None:
        """Per-layer slot targets for the coming steps (by MoE layer ordinal). They steer which layer gives up a
        slot; a layer is never emptied below them by another layer's miss."""
        q = np.asarray(quotas, dtype=np.int64)
        counts = q.tolist()  # checked on a list: a planner may set them after every router
        if q.shape != (self.num_layers,) or min(counts) < 0 or sum(counts) > self.num_slots:
            raise ValueError(f"quotas must be {self.num_layers} non-negative counts summing to at most "
                             f"{self.num_slots} slots, got {counts}")
        self.quota = q

    def share_by_value(self, floor: int | None, prefetch_margin: float = 0.25) -> None:
        """Share slots between layers by value rather than by quota (None: by quota again). While priorities are
        set, a slot any layer needs comes from the least valuable evictable expert of that layer or of any layer
        holding more than `floor` slots (quotas.least_valuable), and a prefetch takes one only if that expert is
        worth less than `prefetch_margin` times the prefetched expert's score."""
        self.floor, self.margin = floor, prefetch_margin

    def protect(self, mask: np.ndarray | None, first: int = 0) -> None:
        """Experts ([L, E] bool) eviction spares while anything else can go; None protects nothing. With `first`,
        `mask` holds rows first.. only and the rows before keep what they had: a planner correcting course as
        layers route changes only the rows of the layers still to come."""
        if mask is None:
            self.protected = np.zeros_like(self.protected)
            self.unprotected = ~self.protected
        elif first == 0:
            self.protected = np.array(mask, dtype=bool)  # a copy: later row updates write into it
            self.unprotected = ~self.protected
        else:
            self.protected[first:] = mask
            np.logical_not(self.protected[first:], out=self.unprotected[first:])

    def prioritize(self, priority: np.ndarray | None, first: int = 0) -> None:
        """Eviction priorities ([L, E], higher: keep longer); None: none. Among the experts a layer may give up,
        the lowest-priority go first and the eviction policy breaks ties. With `first`, as for `protect`."""
        if priority is None:
            self.priority = None
        elif first == 0:
            self.priority = np.array(priority, dtype=np.float64)
        elif self.priority is None:
            raise ValueError("prioritize: rows can only update priorities already set for every layer")
        else:
            self.priority[first:] = priority

    def set_after_use(self, after_use: np.ndarray | None, min_round: int = 1) -> None:
        """Rounds by value: [L, E] each expert's priority once its layer has computed it this step (a planner's
        value of keeping it for later steps), or None (off); a round ends only once it holds `min_round`."""
        if min_round < 1:
            raise ValueError(f"min_round must be >= 1, got {min_round}")
        self.after_use = None if after_use is None else np.asarray(after_use, dtype=np.float64)
        self.min_round = min_round

    def spend(self, li: int, expert: int) -> None:
        """Layer li has computed `expert` for this step: with rounds by value on, it takes its after-use priority
        and loses its protection."""
        if self.after_use is not None and self.priority is not None:
            self.priority[li, expert] = self.after_use[li, expert]
            self.protected[li, expert] = False
            self.unprotected[li, expert] = True

    def round_ends(self, li: int, victim: tuple[int, int], held: dict[int, int]) -> bool:
        """Rounds by value: whether layer li should compute the experts it holds (`held`: expert -> slot) before
        loading more, because `victim`, the expert the next load would evict, is worth more to keep than one of
        those after their use."""
        if len(held) < self.min_round:
            return False
        mine = min(self.after_use[li, e] for e in held)
        return bool(self.protected[victim] or self.priority[victim] > mine)

    def choose(self, li: int, candidates: np.ndarray, policy) -> int:
        """Layer li's expert to evict among `candidates`: the lowest priority; ties, or no priorities, to the
        eviction policy."""
        if self.priority is not None:
            p = np.where(candidates, self.priority[li], np.inf)
            lowest = p == p.min()  # only candidates, unless every candidate's priority is inf
            if np.count_nonzero(lowest) == 1:  # no tie for the policy to break (most evictions)
                return int(lowest.argmax())
            candidates = candidates & lowest
        return policy.victim(li, candidates)
