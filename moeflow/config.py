"""Engine configuration: what the user asks for, validated once.

Values derived at run time (the number of slots a budget buys, the dtype a checkpoint
resolves to) live in the runtime objects that derive them and are never written back here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from moeflow.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PER_LAYER_RE = re.compile(r"^\s*([0-9]+)\s*(?:slots?)?\s*/\s*layer\s*$")


@dataclass(frozen=True, slots=True)
class ExpertBudget:
    """How much device memory the expert cache may use.

    Written as bytes (`8GiB`, `512MB`, `1000000`), a share of all expert bytes (`25%`),
    or slots per MoE layer (`2/layer`).
    """

    kind: Literal["bytes", "fraction", "per_layer"]
    value: float

    @classmethod
    def parse(cls, text: str) -> ExpertBudget:
        if not isinstance(text, str):
            raise ConfigError(f"expert budget must be a string such as '25%', '8GiB' or '2/layer', got {text!r}")
        s = text.strip()
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ConfigError(f"expert budget {text!r}: '{s[:-1]}' is not a number") from None
            if not 0 < pct <= 100:
                raise ConfigError(f"expert budget {text!r}: a percentage must be in (0, 100]")
            return cls("fraction", pct / 100)
        if m := _PER_LAYER_RE.match(s):
            n = int(m.group(1))
            if n < 1:
                raise ConfigError(f"expert budget {text!r}: at least 1 slot per layer")
            return cls("per_layer", n)
        if m := _BYTES_RE.match(s):
            unit = m.group(2).lower()
            if unit not in _UNITS:
                raise ConfigError(
                    f"expert budget {text!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB, ...)"
                )
            n = float(m.group(1)) * _UNITS[unit]
            if n <= 0:
                raise ConfigError(f"expert budget {text!r} must be positive")
            return cls("bytes", n)
        raise ConfigError(f"expert budget {text!r} not understood: write e.g. '25%', '8GiB' or '2/layer'")

    def num_slots(self, *, expert_bytes: int, num_moe_layers: int, num_experts: int) -> int:
        """Slots this budget buys, capped at one slot per expert of the model."""
        total = num_moe_layers * num_experts
        if self.kind == "fraction":
            n = math.floor(self.value * total + 1e-9)
        elif self.kind == "per_layer":
            n = int(self.value) * num_moe_layers
        else:
            n = int(self.value // expert_bytes)
        return min(n, total)

    def __str__(self) -> str:
        if self.kind == "fraction":
            return f"{self.value * 100:g}%"
        if self.kind == "per_layer":
            return f"{int(self.value)}/layer"
        return format_bytes(self.value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def budget_text(n: float) -> str:
    """A byte count as the smallest budget string (rounded up, never down) that covers it."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{math.ceil(n / size * 100) / 100:g}{unit}"
    return f"{math.ceil(n)}B"


EVICTION_POLICIES = ("lru", "lfu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULER_POLICIES = ("fcfs", "route-aware")
ROUTING_MODES = ("exact", "lynx")


def _is_int(value) -> bool:
    """An integer, and not a bool (True would pass isinstance(True, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    budget: ExpertBudget = field(default_factory=lambda: ExpertBudget("fraction", 1.0))
    eviction: str = "lru"

    def __post_init__(self) -> None:
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction policy {self.eviction!r} unknown; choose one of {', '.join(EVICTION_POLICIES)}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings, capped at 4096
    max_num_seqs: int = 16  # sequences running at once: the rows of the KV cache
    max_batch_size: int | None = None  # the most sequences one decode step takes; None: max_num_seqs
    max_num_batched_tokens: int = 4096  # prompt tokens per prefill step
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: str = "fcfs"
    predictor: str | None = None  # a predictor's name ("previous", "frequency") or directory; None: on demand
    max_decode_wait: int = 4  # route-aware scheduling: steps a sequence may wait beyond its round-robin share
    max_admit_wait: int | None = None  # route-aware, offloaded: steps a new request may be held back to be
    # prefilled with others (0: at once, as fcfs; None: the running sequences' wait bound)
    routing_modes: tuple[str, ...] = ("exact", "lynx")  # what requests may ask for; lynx's graphs cost start-up
    lynx_alpha: float | None = None  # None: the model's default (architectures/lynx.py)
    lynx_beta: int | None = None
    lynx_resident_weight: int = 0  # bin-0 votes a resident expert earns in LYNX's binning (0: plain LYNX)
    seed: int = 0
    enforce_eager: bool = False  # True: never replay decode steps as CUDA graphs
    fused_ops: bool | None = None  # fused norms, router, QK norm + rotary + KV write; None: on CUDA with Triton
    gate_ahead: bool = False  # True: each MoE layer guesses the next one's experts with its router (the planner's)
    expert_rounds: int = 0  # the predictive cache (a learned predictor): an offloaded layer whose loads would evict
    # experts worth more than ones it holds computes its experts in rounds of at least this many (0: off)
    prefetch_margin: float | None = None  # the predictive cache: a prefetch may evict only an expert worth less than
    # this times the prefetched expert's chance of use (None: the planner's own, 0.25)
    overlap_output: bool | None = None  # build a step's outputs while the next runs (step() returns them a step
    # later); None: on CUDA, where the device has a step to run meanwhile
    async_scheduling: bool | None = None  # plan and launch the next step before the host takes this one's tokens
    # (its input tokens stay on the device); a resident pool, no predictor, a policy that reads no routes; None: on
    # CUDA wherever that holds
    allow_nonfinite_weights: bool = False  # True: load weights holding NaN or Inf instead of refusing them

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} unknown; choose one of {', '.join(DTYPES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} unknown; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_batch_size is not None and not 1 <= self.max_batch_size <= self.max_num_seqs:
            raise ConfigError(f"max_batch_size must be between 1 and max_num_seqs={self.max_num_seqs}, "
                              f"got {self.max_batch_size}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if "exact" not in self.routing_modes or not set(self.routing_modes) <= set(ROUTING_MODES):
            raise ConfigError(f"routing_modes {self.routing_modes!r}: 'exact' and any of "
                              f"{', '.join(ROUTING_MODES[1:])}")
        if self.lynx_alpha is not None and not (math.isfinite(self.lynx_alpha) and self.lynx_alpha > 0):
            raise ConfigError(f"lynx_alpha must be a finite number > 0, got {self.lynx_alpha}")
        if self.lynx_beta is not None and (not _is_int(self.lynx_beta) or self.lynx_beta < 1):
            raise ConfigError(f"lynx_beta must be an integer >= 1, got {self.lynx_beta!r}")
        if not _is_int(self.lynx_resident_weight) or self.lynx_resident_weight < 0:
            raise ConfigError(f"lynx_resident_weight must be an integer >= 0, got {self.lynx_resident_weight!r}")
        if not _is_int(self.max_decode_wait) or self.max_decode_wait < 0:
            raise ConfigError(f"max_decode_wait must be an integer >= 0 (steps), got {self.max_decode_wait!r}")
        if self.max_admit_wait is not None and (not _is_int(self.max_admit_wait) or self.max_admit_wait < 0):
            raise ConfigError(f"max_admit_wait must be an integer >= 0 (steps) or None, got {self.max_admit_wait!r}")
        if not _is_int(self.expert_rounds) or self.expert_rounds < 0:
            raise ConfigError(f"expert_rounds must be an integer >= 0 (0: off), got {self.expert_rounds!r}")
        m = self.prefetch_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0):
            raise ConfigError(f"prefetch_margin must be a finite number >= 0 (or None: the planner's own), got {m!r}")
        if self.scheduler not in SCHEDULER_POLICIES:
            raise ConfigError(f"scheduler {self.scheduler!r} unknown; choose one of {', '.join(SCHEDULER_POLICIES)}")

    @property
    def decode_batch_size(self) -> int:
        return self.max_batch_size if self.max_batch_size is not None else self.max_num_seqs
