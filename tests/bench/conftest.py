from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The benchmarks' CPU runs are many small ops: on a shared two-core machine, torch's thread pool waiting
    on busy cores costs them ten times over, so each test here runs on one thread."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)
