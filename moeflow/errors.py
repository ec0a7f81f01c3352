"""Errors moeflow raises on bad input. Each message names the problem and, where it can, the fix."""


class MoeflowError(Exception):
    """Base class: a problem with what the user gave moeflow, not a bug in moeflow."""


class CheckpointError(MoeflowError):
    """A model directory that is missing files, tensors, or holds an unsupported architecture."""


class ConfigError(MoeflowError, ValueError):
    """An engine, cache or sampling setting that is out of range or inconsistent."""


class BudgetError(ConfigError):
    """An expert budget too small to hold what one MoE layer needs at once."""


class RequestError(MoeflowError, ValueError):
    """A request the engine cannot accept: empty prompt, prompt longer than the context, ..."""
