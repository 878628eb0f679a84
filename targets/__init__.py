"""Targets that turn a Graph into a deployable, verified artifact folder.

Each target module has one public entry point, ``export(graph, out_dir, options) -> Manifest``,
and an options dataclass. ``TARGETS`` maps snapc's target names to them; heavy runtimes are
imported only when a target is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapc.errors import UnknownNameError

__all__ = ["TargetEntry", "TARGETS", "get_target"]


@dataclass(frozen=True)
class TargetEntry:
    """A target name: its module, options class and a one-line description."""

    name: str
    module: str
    options: str
    description: str
    preset: dict[str, Any] | None = None

    def load(self) -> tuple[Callable[..., Any], type]:
        """Return (export function, options class), importing the module now."""
        mod = importlib.import_module(self.module)
        return mod.export, getattr(mod, self.options)

    def make_options(self, **overrides: Any) -> Any:
        """Return an options object: the target's preset, then ``overrides`` (None ignored)."""
        _, options_cls = self.load()
        values = dict(self.preset or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return options_cls(**values)


TARGETS: dict[str, TargetEntry] = {
    "onnx": TargetEntry("onnx", "snapc.targets.onnx", "OnnxOptions",
                        "ONNX model verified in onnxruntime (CPU)"),
    "coreml": TargetEntry("coreml", "snapc.targets.coreml", "CoreMLOptions",
                          "Core ML mlprogram for the Apple Neural Engine (fp16, iOS 17), "
                          "verified by a MIL interpreter on Linux"),
    "coreml-palette6": TargetEntry("coreml-palette6", "snapc.targets.coreml", "CoreMLOptions",
                                   "Core ML, 6-bit palettized weights", preset={"palettize": 6}),
}


def _register_tvm() -> None:
    """Add the TVM targets (adreno, mali, arm-cpu, x86, cuda); their table needs no TVM."""
    from snapc.targets.tvm_targets import TVM_TARGETS

    for name, spec in TVM_TARGETS.items():
        TARGETS[name] = TargetEntry(name, "snapc.targets.tvm", "TvmOptions",
                                    f"TVM: {spec.description}", preset={"target": name})


_register_tvm()


def get_target(name: str) -> TargetEntry:
    """Return the registered target ``name`` or raise UnknownNameError listing the valid ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownNameError("target", name, list(TARGETS)) from None
