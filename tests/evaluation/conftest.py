"""The evaluation tests decode the bundled model on the CPU, where one thread is as fast as two for its small
matrices and far faster when other processes share the cores (threads that wait for each other at every op)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # every test here (tests/conftest.py says why)
    yield
