from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # every test here (tests/conftest.py says why)
    yield
