"""Predictors forecast, before a step runs, which experts each MoE layer will use (see base.py)."""

from __future__ import annotations

from moeflow.architectures.spec import ModelSpec
from moeflow.routing.predictors.base import (Prediction, Predictor, PredictorBase, RefiningPredictor, RequestHints,
                                             RequestView, StepView)
from moeflow.routing.predictors.frequency import FrequencyPredictor
from moeflow.routing.predictors.learned import LearnedPredictor, LearnedPrediction, load_predictor
from moeflow.routing.predictors.net import find_predictor
from moeflow.routing.predictors.previous import PreviousPredictor

BUILTIN = {"previous": PreviousPredictor, "frequency": FrequencyPredictor}


def make_predictor(name: str, spec: ModelSpec) -> Predictor:
    """A built-in predictor by name, sized for a model."""
    try:
        cls = BUILTIN[name]
    except KeyError:
        from moeflow.errors import ConfigError

        raise ConfigError(f"predictor {name!r} unknown; choose one of {', '.join(BUILTIN)}") from None
    return cls(spec.num_moe_layers, spec.num_experts)


__all__ = ["BUILTIN", "FrequencyPredictor", "LearnedPrediction", "LearnedPredictor", "Prediction", "Predictor",
           "PredictorBase", "PreviousPredictor", "RefiningPredictor", "RequestHints", "RequestView", "StepView",
           "find_predictor", "load_predictor", "make_predictor"]
