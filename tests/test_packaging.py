"""The wheel holds every subpackage: pyproject's explicit package list must name them all."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_snapc_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {"snapc." + ".".join(p.parent.relative_to(REPO / "snapc").parts)
             for p in (REPO / "snapc").rglob("__init__.py") if p.parent != REPO / "snapc"}
    found |= {"snapc", "snapc.passes", "snapc.targets"}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
