"""What an engine resolves once, at set-up: its device and dtype, its context length, the slots a budget buys,
and the predictor and scheduling policy its configuration names."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from moeflow.architectures.spec import ModelSpec
from moeflow.config import EngineConfig, ExpertBudget, budget_text, format_bytes
from moeflow.engine.policies import POLICIES as SCHEDULING_POLICIES
from moeflow.engine.scheduler import SchedulingPolicy
from moeflow.errors import BudgetError, ConfigError
from moeflow.models import fused_decode
from moeflow.routing.lynx import AffinityBinning
from moeflow.routing.predictors import BUILTIN, Predictor, find_predictor, load_predictor, make_predictor

log = logging.getLogger("moeflow.engine")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 4096


def resolve_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA device; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "cuda" and device.index is None:
        # an explicit index: torch.cuda calls given a device without one look the current device up each time
        # (tens of microseconds, and the transfer engine makes a few dozen such calls per decode step)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU, and the checkpoint's half-precision type (else bfloat16) on CUDA."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(spec.torch_dtype, torch.bfloat16) if spec.torch_dtype != "float32" else torch.bfloat16


def resolve_fused(asked: bool | None, device: torch.device) -> bool:
    """EngineConfig.fused_ops: as asked, or by default wherever the kernels run (CUDA with Triton, never the
    interpreter)."""
    return asked if asked is not None else device.type == "cuda" and fused_decode.fused_available(device)


def resolve_overlap(asked: bool | None, device: torch.device) -> bool:
    """EngineConfig.overlap_output and .async_scheduling, the host's work overlapped with the device's: as asked,
    or by default where the device runs a step while the host works (CUDA; an H100 ran resident decode 1.02-1.03x
    faster with outputs overlapped and 1.12-1.20x more with steps launched ahead,
    docs/benchmarks/2026-12-06-h100-session12). On the CPU the host is the device, and there is nothing to
    overlap. Steps async scheduling cannot apply to (LLMEngine.async_blocker) are settled at once either way."""
    return asked if asked is not None else device.type == "cuda"


def resolve_max_model_len(asked: int | None, spec: ModelSpec) -> int:
    if asked is None:
        return min(spec.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if asked > spec.max_position_embeddings:
        raise ConfigError(f"max_model_len={asked} exceeds the model's max_position_embeddings="
                          f"{spec.max_position_embeddings}")
    return asked


def named_policy(config: EngineConfig) -> SchedulingPolicy:
    if config.scheduler == "route-aware":
        return SCHEDULING_POLICIES["route-aware"](max_decode_wait=config.max_decode_wait,
                                                  max_admit_wait=config.max_admit_wait)
    if config.max_admit_wait is not None:
        log.warning("max_admit_wait=%d has no effect with scheduling %r: only route-aware holds requests back",
                    config.max_admit_wait, config.scheduler)
    return SCHEDULING_POLICIES[config.scheduler]()


def named_selector(config: EngineConfig, spec: ModelSpec) -> AffinityBinning | None:
    """The engine's LYNX selector at the configured (or the model's) alpha and beta, where requests may ask for
    lynx routing; None where they may not."""
    if "lynx" not in config.routing_modes:
        return None
    return AffinityBinning.for_spec(spec, config.lynx_alpha, config.lynx_beta, config.lynx_resident_weight)


def named_predictor(config: EngineConfig, spec: ModelSpec, checkpoint, device: torch.device,
                    embedding: torch.Tensor) -> Predictor | None:
    """config.predictor: None, a built-in's name, "auto" (the predictor shipped inside or beside the model
    directory, if there is one), or a predictor directory."""
    name = config.predictor
    if name is None or name in BUILTIN:
        return None if name is None else make_predictor(name, spec)
    path = find_predictor(config.model) if name == "auto" else Path(name)
    if path is None:
        return None
    if not path.is_dir():
        raise ConfigError(f"predictor {name!r} is neither a built-in ({', '.join(BUILTIN)}), 'auto', nor a "
                          f"directory")
    return load_predictor(path, checkpoint, device, embedding=embedding)


def check_planner_options(config: EngineConfig, predictor: Predictor | None, planner) -> None:
    """config.expert_rounds and config.prefetch_margin set the predictive cache, which only a learned predictor
    brings: refused where the engine's planner did not take them."""
    asked = []
    if config.expert_rounds and getattr(planner, "rounds", 0) != config.expert_rounds:
        asked.append(f"expert_rounds={config.expert_rounds}")
    if config.prefetch_margin is not None and getattr(planner, "prefetch_margin", None) != config.prefetch_margin:
        asked.append(f"prefetch_margin={config.prefetch_margin}")
    if not asked:
        return
    has = (f"its predictor is {type(predictor).__name__}" if predictor is not None
           else f"predictor={config.predictor!r} found none" if config.predictor else "it has no predictor")
    raise ConfigError(f"{' and '.join(asked)} {'needs' if len(asked) == 1 else 'need'} the predictive cache, which a "
                      f"learned predictor brings (a predictor directory, or 'auto' with a model that ships one); {has}")


def budget_slots(spec: ModelSpec, expert_bytes: int, budget: ExpertBudget) -> int:
    """The slots `budget` buys, refused with the smallest budget that works if it cannot hold one token's top-k."""
    slots = budget.num_slots(expert_bytes=expert_bytes, num_moe_layers=spec.num_moe_layers,
                             num_experts=spec.num_experts)
    need = spec.router.top_k
    if slots < need:
        total = spec.num_moe_layers * spec.num_experts
        raise BudgetError(
            f"expert budget {budget} buys {slots} slot(s) of {format_bytes(expert_bytes)} each, but one MoE "
            f"layer needs its top-{need} experts on the device at once. The smallest budget that works is "
            f"{need} slots: --expert-budget {budget_text(need * expert_bytes)} "
            f"(or {math.ceil(10000 * need / total) / 100:g}%)"
        )
    return slots
