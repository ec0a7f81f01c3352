"""Selectors: rewrite a batch's routing before the experts run.

The exact selector leaves the router's choice alone; approximate selectors (batch-aware
expert reduction) plug in here, and only here, so the exact path never pays for them.
"""

from __future__ import annotations

from typing import Protocol

from moeflow.routing.router import Routing


class Selector(Protocol):
    exact: bool

    def select(self, layer: int, routing: Routing) -> Routing: ...


class ExactSelector:
    exact = True

    def select(self, layer: int, routing: Routing) -> Routing:
        return routing
