"""What moeflow knows of each supported architecture: the ModelSpec read from config.json, and the registry
keyed by its `architectures` entry. Ground floor: weights, experts, routing and models all build on it."""

from moeflow.architectures.registry import ARCHITECTURES, spec_from_config
from moeflow.architectures.spec import ModelSpec, RouterSpec

__all__ = ["ARCHITECTURES", "ModelSpec", "RouterSpec", "spec_from_config"]
