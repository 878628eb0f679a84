"""Shared fixtures: one traced `tiny` graph per session, and the `slow` marker gate."""

from __future__ import annotations

import os

import pytest
import torch

from snapc.compiler import load_graph
from snapc.graph import Graph


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker an equal share of the cores: torch's default of
    one thread per core in every worker oversubscribes the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked slow unless SNAPC_SLOW=1 (SD-1.5-scale: minutes and GBs of RAM)."""
    if os.environ.get("SNAPC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="SD-1.5-scale test; set SNAPC_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_graph() -> Graph:
    """Return the traced `tiny` UNet (random weights, seed 0)."""
    return load_graph("tiny")
