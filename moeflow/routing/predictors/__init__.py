"""Predictors forecast, before a step runs, which experts each MoE layer will use."""

from moeflow.routing.predictors.base import NoPredictor, Predictor

__all__ = ["NoPredictor", "Predictor"]
