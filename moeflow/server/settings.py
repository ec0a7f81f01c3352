"""ServerSettings: what `moeflow serve` was asked for beyond the engine's own configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeflow.errors import ConfigError

DEFAULT_MAX_REQUEST_BYTES = 2 * 2**20


@dataclass(frozen=True, slots=True)
class ServerSettings:
    served_model_name: str  # the name clients pass as `model`
    model_dir: str
    api_key: str | None = None  # when set, every route but /health and /metrics wants `Authorization: Bearer <key>`
    max_queue: int = 512  # engine requests waiting for a KV row beyond which new calls get 503
    drain_timeout_s: float = 30.0  # on SIGTERM/Ctrl-C, how long running requests may take to finish
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413
    header_timeout_s: float = 10.0  # a request's headers must arrive within this, else 408
    body_timeout_s: float = 30.0  # and its body within this after them, else 408
    default_routing: str = "exact"  # a request's routing when it names none

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("served model name must not be empty")
        if self.api_key is not None:
            _check_api_key(self.api_key)
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout_s}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        if self.default_routing not in ("exact", "lynx"):
            raise ConfigError(f"default routing {self.default_routing!r} unknown; choose exact or lynx")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")


def _check_api_key(key: str) -> None:
    """An empty key would silently turn authentication off, and one no client can send locks everyone out."""
    if not key.strip():
        raise ConfigError("the api_key (--api-key or $MOEFLOW_API_KEY) is empty or blank; set a real key, or unset "
                          "it to serve without authentication")
    if key != key.strip():
        raise ConfigError("the api_key (--api-key or $MOEFLOW_API_KEY) starts or ends with whitespace, which an "
                          "Authorization header cannot carry")
    if not all(" " <= c <= "~" for c in key):
        raise ConfigError("the api_key (--api-key or $MOEFLOW_API_KEY) holds characters other than printable ASCII, "
                          "which an Authorization header cannot carry reliably")
