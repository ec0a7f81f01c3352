"""Scheduling policies, by name (engine/scheduler.py says what a policy decides)."""

from moeflow.engine.policies.fcfs import FCFSPolicy

POLICIES = {"fcfs": FCFSPolicy}

__all__ = ["FCFSPolicy", "POLICIES"]
