"""What the expert cache counts, per MoE layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    hits: int = 0  # distinct experts a step needed that were already resident
    misses: int = 0  # distinct experts a step needed that had to be loaded on demand
    bytes_moved: int = 0  # host->device bytes of demand loads
    stall_s: float = 0.0  # time the compute stream waited for expert copies (demand and late prefetches)
    prefetches: int = 0  # loads queued by a prediction
    prefetch_bytes: int = 0
    prefetch_hits: int = 0  # prefetched experts a step then used (counted among the hits too)
    wasted_prefetches: int = 0  # prefetched experts that left the cache, or were dropped, before any use

    @property
    def total_bytes(self) -> int:
        """Every host->device byte: demand loads and prefetches."""
        return self.bytes_moved + self.prefetch_bytes

    def add(self, other: LayerStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class CacheStats:
    per_layer: dict[int, LayerStats] = field(default_factory=dict)
    preload_bytes: int = 0  # start-up fill of a fully resident pool, not counted as misses

    def total(self) -> LayerStats:
        out = LayerStats()
        for s in self.per_layer.values():
            out.add(s)
        return out
