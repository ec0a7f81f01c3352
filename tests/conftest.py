"""Shared fixtures: tiny checkpoints of every family (made once per session), GPU skipping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import FAMILIES, LAYOUTS, make_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, layout) -> directory of a tiny random checkpoint, made once per session."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, layout: str = "per_expert") -> Path:
        assert family in FAMILIES and layout in LAYOUTS
        if (family, layout) not in made:
            made[family, layout] = make_checkpoint(family, layout, tmp_path_factory.mktemp(f"{family}-{layout}"))
        return made[family, layout]

    return get


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: the bundled model's and the predictors' CPU work is many small ops, and on
    a two-core machine that other processes share, torch's threads waiting for each other cost them many times
    over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
