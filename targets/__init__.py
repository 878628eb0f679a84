"""Targets that turn a Graph into a deployable, verified artifact folder.

Each target module has one public entry point, ``export(graph, out_dir, options) -> Manifest``,
and an options dataclass. ``TARGETS`` maps snapc's target names to them; heavy runtimes are
imported only when a target is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from snapc.errors import SnapcError, UnknownNameError

__all__ = ["TargetEntry", "TARGETS", "get_target"]


@dataclass(frozen=True)
class TargetEntry:
    """A target name: its module, options class and a one-line description.

    ``quant_schemes``: the quantization schemes (passes/quantize.py) whose records the target
    realises; none means it would ignore them, so compiling with --quantize is refused.
    """

    name: str
    module: str
    options: str
    description: str
    preset: dict[str, Any] | None = None
    quant_schemes: tuple[str, ...] = ()

    def load(self) -> tuple[Callable[..., Any], type]:
        """Return (export function, options class), importing the module now."""
        mod = importlib.import_module(self.module)
        return mod.export, getattr(mod, self.options)

    def make_options(self, **overrides: Any) -> Any:
        """Return an options object: the target's preset, then ``overrides`` (None ignored).

        Raises SnapcError for an option the target does not have."""
        _, options_cls = self.load()
        values = dict(self.preset or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        valid = [f.name for f in fields(options_cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise SnapcError(f"target '{self.name}' has no option {', '.join(unknown)}; its "
                             f"options: {', '.join(valid)}")
        return options_cls(**values)


# Core ML has no int4 realisation here (palette4 stores 4 bits); w8a8 keeps only its weights.
_ONNX_QUANT = ("fp16", "w8", "w4", "w8a8", "palette6", "palette4", "mixed")
_COREML_QUANT = ("fp16", "w8", "w8a8", "palette6", "palette4", "mixed")
# targets/tvm_quant.REALISED (integer codes dequantized in the graph), plus mixed, which picks
# among them; fp16 records only where the build is fp16 (the mobile GPUs).
_TVM_QUANT = ("w8", "w8a8", "w4", "palette6", "palette4", "mixed")

TARGETS: dict[str, TargetEntry] = {
    "onnx": TargetEntry("onnx", "snapc.targets.onnx", "OnnxOptions",
                        "ONNX model verified in onnxruntime (CPU)", quant_schemes=_ONNX_QUANT),
    "coreml": TargetEntry("coreml", "snapc.targets.coreml", "CoreMLOptions",
                          "Core ML mlprogram for the Apple Neural Engine (fp16, iOS 17), "
                          "verified by a MIL interpreter on Linux", quant_schemes=_COREML_QUANT),
    "coreml-palette6": TargetEntry("coreml-palette6", "snapc.targets.coreml", "CoreMLOptions",
                                   "Core ML, 6-bit palettized weights", preset={"palettize": 6},
                                   quant_schemes=_COREML_QUANT),
}


def _register_tvm() -> None:
    """Add the TVM targets (adreno, mali, arm-cpu, x86, cuda); their table needs no TVM."""
    from snapc.targets.tvm_targets import TVM_TARGETS

    for name, spec in TVM_TARGETS.items():
        fp16 = ("fp16",) if spec.default_precision == "fp16" else ()
        TARGETS[name] = TargetEntry(name, "snapc.targets.tvm", "TvmOptions",
                                    f"TVM: {spec.description}", preset={"target": name},
                                    quant_schemes=_TVM_QUANT + fp16)


_register_tvm()


def get_target(name: str) -> TargetEntry:
    """Return the registered target ``name`` or raise UnknownNameError listing the valid ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownNameError("target", name, list(TARGETS)) from None
