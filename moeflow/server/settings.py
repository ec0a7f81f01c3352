"""ServerSettings: what `moeflow serve` was asked for beyond the engine's own configuration."""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ServerSettings:
    served_model_name: str  # the name clients pass as `model`
    model_dir: str
    api_key: str | None = None  # when set, every /v1 route wants `Authorization: Bearer <key>`
    max_queue: int = 512  # engine requests waiting for a KV row beyond which new calls get 503
    drain_timeout_s: float = 30.0  # on SIGTERM/Ctrl-C, how long running requests may take to finish

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("served model name must not be empty")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout_s}")
