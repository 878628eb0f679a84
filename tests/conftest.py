"""Shared fixtures: one traced `tiny` graph per session, and the `slow` marker gate."""

from __future__ import annotations

import os

import pytest

from snapc.compiler import load_graph
from snapc.graph import Graph


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
