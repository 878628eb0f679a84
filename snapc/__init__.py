"""snapc: compiler-style graph optimisation for text-to-image diffusion UNets on phones.

The public API is imported lazily so that `snapc --help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "trace": "snapc.frontend",
    "Graph": "snapc.graph",
    "ModelInfo": "snapc.graph",
    "verify": "snapc.numerics",
    "compare": "snapc.numerics",
    "Numerics": "snapc.numerics",
    "Pass": "snapc.pipeline",
    "PassResult": "snapc.pipeline",
    "PassContext": "snapc.pipeline",
    "Change": "snapc.pipeline",
    "Pipeline": "snapc.pipeline",
    "PassError": "snapc.pipeline",
    "snapc_pass": "snapc.pipeline",
    "register_pass": "snapc.pipeline",
    "load_model": "snapc.models",
    "load_graph": "snapc.compiler",
    "compile_model": "snapc.compiler",
    "CompileOptions": "snapc.compiler",
    "SnapcError": "snapc.errors",
    "CostModel": "snapc.cost",
    "load_device": "snapc.cost",
    "LatencyTable": "snapc.cost",
    "profile_graph": "snapc.profile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'snapc' has no attribute {name!r}")
