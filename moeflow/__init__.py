"""moeflow: run and serve Mixture-of-Experts language models whose experts do not fit in GPU memory."""

from moeflow.config import CacheConfig, EngineConfig, ExpertBudget
from moeflow.llm import LLM
from moeflow.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "CacheConfig", "ExpertBudget"]
__version__ = "0.1.0"
