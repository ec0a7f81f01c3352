"""The evaluation tests decode the bundled model on the CPU, where one thread is as fast as two for its small
matrices and far faster when other processes share the cores (threads that wait for each other at every op)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
