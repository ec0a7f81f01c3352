"""Files that ship inside the package: the bundled default model."""

from pathlib import Path

from moeflow.errors import CheckpointError

DEFAULT_MODEL = Path(__file__).parent / "moeflow-tiny"


def default_model_dir() -> Path:
    """The bundled tiny model, used when a command is given no model directory."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise CheckpointError(f"no model directory given, and the bundled default model is missing from {DEFAULT_MODEL}")
    return DEFAULT_MODEL
