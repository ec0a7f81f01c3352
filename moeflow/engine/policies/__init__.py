"""Scheduling policies, by name (engine/scheduler.py says what a policy decides)."""

from moeflow.engine.policies.fcfs import FCFSPolicy
from moeflow.engine.policies.route_aware import RouteAwarePolicy

POLICIES = {"fcfs": FCFSPolicy, "route-aware": RouteAwarePolicy}

__all__ = ["FCFSPolicy", "POLICIES", "RouteAwarePolicy"]
