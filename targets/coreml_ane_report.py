"""ANE report: the ops and tensors of a MIL program that will not run on the Neural Engine.

Apple does not publish the Neural Engine's op set, so each rule cites where its constraint is
documented (``SOURCES``); Core ML silently runs an op that breaks one on the CPU or GPU,
splitting the program and copying tensors between devices. The rules:

- ``dynamic_shape``: a tensor with a symbolic dimension (ranged or unbounded inputs);
- ``unsupported_op``: op types with no Neural Engine path (gather/scatter, recurrent layers,
  control flow, ``reduce_prod``, ...);
- ``dilated_conv``: convolutions with a dilation above 1;
- ``conv_kernel_width``: convolution kernels wider than 13;
- ``rank``: tensors of rank above 5;
- ``large_dim``: width or height (last two axes) above 16384, channels (third from last)
  above 65536;
- ``dtype``: ops computing in fp32 or integers (the Neural Engine datapath is fp16); the casts
  that convert model inputs and outputs are exempt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["AneIssue", "AneReport", "ane_report", "SOURCES", "UNSUPPORTED_OPS",
           "MAX_RANK", "MAX_SPATIAL", "MAX_CHANNELS", "MAX_KERNEL_WIDTH"]

SOURCES = {
    "coremltools-flexible-shapes": "https://apple.github.io/coremltools/docs-guides/source/"
                                   "flexible-inputs.html (ranged shapes do not use the NE)",
    "hollance-unsupported": "https://github.com/hollance/neural-engine/blob/master/docs/"
                            "unsupported-layers.md",
    "ane-guide-capability": "https://ane-guide.readthedocs.io/en/latest/part-1-machine/"
                            "04-capability-surface.html",
    "ane-guide-design-rules": "https://ane-guide.readthedocs.io/en/latest/part-5-practice/"
                              "17-model-design-rules.html",
    "apple-ane-transformers": "https://machinelearning.apple.com/research/"
                              "neural-engine-transformers",
}

# op type -> source key
UNSUPPORTED_OPS = {
    **dict.fromkeys(("gather", "gather_nd", "gather_along_axis"), "hollance-unsupported"),
    **dict.fromkeys(("lstm", "gru", "rnn"), "hollance-unsupported"),
    **dict.fromkeys(("scatter", "scatter_nd", "scatter_along_axis", "reduce_prod"),
                    "ane-guide-capability"),
    **dict.fromkeys(("while_loop", "cond", "non_maximum_suppression"), "hollance-unsupported"),
}
MAX_RANK = 5  # "Max tensor rank: 5" (apple-ane-transformers layout; ane-guide design rules)
MAX_SPATIAL = 16384  # width and height (ane-guide-design-rules)
MAX_CHANNELS = 65536  # channels (ane-guide-design-rules)
MAX_KERNEL_WIDTH = 13  # convolution kernel width (ane-guide-design-rules)


@dataclass(frozen=True)
class AneIssue:
    """One op or tensor that will not run on the Neural Engine, why, and where."""

    rule: str
    op: str
    op_type: str
    layer: str
    reason: str
    source: str
    tensor: str = ""
    shape: tuple[Any, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        data = asdict(self)
        data["shape"] = [d if isinstance(d, int) else str(d) for d in self.shape]
        data["source"] = SOURCES[self.source]
        return data


@dataclass(frozen=True)
class AneReport:
    """All issues of one program, with the number of ops checked."""

    issues: tuple[AneIssue, ...]
    ops_checked: int

    @property
    def clean(self) -> bool:
        """True when nothing was found."""
        return not self.issues

    def counts(self) -> dict[str, int]:
        """Return the number of issues per rule."""
        out: dict[str, int] = {}
        for issue in self.issues:
            out[issue.rule] = out.get(issue.rule, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (summary and every issue)."""
        return {"ops_checked": self.ops_checked, "clean": self.clean, "counts": self.counts(),
                "issues": [i.to_json() for i in self.issues]}

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path`` and return it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _is_static(shape: tuple[Any, ...]) -> bool:
    return all(isinstance(d, int) or hasattr(d, "__index__") for d in shape)


def _dtype_name(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(var.dtype)
    except (KeyError, TypeError, AttributeError):
        return str(var.dtype)


def _weight_layers(ops: list[Any]) -> dict[str, str]:
    """Return {op name: layer}, the layer of the last weight constant read so far in op order.

    Fallback for programs without module scopes: weight constants are named after their
    parameter (``net_down_blocks_0_..._weight_to_fp16``).
    """
    layers: dict[str, str] = {}
    current = ""
    for op in ops:
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                name = var.name
                if var.op is not None and var.op.op_type == "const" and "_weight" in name:
                    current = name.split("_weight")[0].removeprefix("net_").removeprefix("p_net_")
        layers[op.name] = current
    return layers


def _op_vars(op: Any) -> list[Any]:
    return [v for v in op.outputs if v is not None]


def _check_op(op: Any, io_names: set[str]) -> list[tuple[str, str, str, Any]]:
    """Return (rule, reason, source, var or None) for each broken constraint of one op."""
    found: list[tuple[str, str, str, Any]] = []
    if op.op_type in UNSUPPORTED_OPS:
        found.append(("unsupported_op", f"{op.op_type} has no Neural Engine implementation",
                      UNSUPPORTED_OPS[op.op_type], None))
    if op.op_type == "conv":
        dil = op.inputs.get("dilations")
        if dil is not None and dil.val is not None and any(int(d) > 1 for d in dil.val):
            found.append(("dilated_conv", f"dilated convolution {list(map(int, dil.val))}",
                          "hollance-unsupported", None))
        weight = op.inputs["weight"]
        if len(weight.shape) >= 3 and int(weight.shape[-1]) > MAX_KERNEL_WIDTH:
            found.append(("conv_kernel_width", f"kernel width {weight.shape[-1]} > "
                          f"{MAX_KERNEL_WIDTH}", "ane-guide-design-rules", None))
    for var in _op_vars(op):
        shape = tuple(var.shape) if var.shape is not None else ()
        if not _is_static(shape):
            found.append(("dynamic_shape", "shape is not static; Core ML runs ranged or unbounded"
                          " shapes off the Neural Engine (use fixed or enumerated shapes)",
                          "coremltools-flexible-shapes", var))
            continue
        if len(shape) > MAX_RANK:
            found.append(("rank", f"rank {len(shape)} > {MAX_RANK}", "ane-guide-design-rules", var))
        dims = [int(d) for d in shape]
        if any(d > MAX_SPATIAL for d in dims[-2:]) or (len(dims) >= 3
                                                       and dims[-3] > MAX_CHANNELS):
            found.append(("large_dim", f"dimension over the Neural Engine limit (width/height "
                          f"<= {MAX_SPATIAL}, channels <= {MAX_CHANNELS})",
                          "ane-guide-design-rules", var))
        dtype = _dtype_name(var)
        exempt = op.op_type == "cast" and (var.name in io_names or any(
            v.name in io_names for v in op.inputs.values() if not isinstance(v, (list, tuple))))
        if dtype in ("fp32", "int32", "int64", "fp64") and not exempt:
            found.append(("dtype", f"computes in {dtype}; the Neural Engine datapath is fp16",
                          "ane-guide-design-rules", var))
    return found


def ane_report(program: Any, layer_of: Callable[[Any], str] | None = None,
               function: str = "main") -> AneReport:
    """Check every op of ``function`` against the Neural Engine constraints; return the report.

    ``layer_of(op)`` names the source layer of an op (e.g. from module scopes); without it, or
    when it returns "", the layer of the last weight read before the op is used.
    """
    block = program.functions[function]
    ops = [op for op in block.operations if not op.op_type.startswith("const")]
    io_names = set(block.inputs) | {v.name for v in block.outputs}
    fallback = _weight_layers(list(block.operations))
    issues: list[AneIssue] = []
    for name, var in block.inputs.items():
        if not _is_static(tuple(var.shape)):
            issues.append(AneIssue("dynamic_shape", name, "input", "(model input)",
                                   "model input has a flexible shape",
                                   "coremltools-flexible-shapes", name, tuple(var.shape)))
    for op in ops:
        for rule, reason, source, var in _check_op(op, io_names):
            layer = (layer_of(op) if layer_of else "") or fallback.get(op.name, "")
            issues.append(AneIssue(rule, op.name, op.op_type, layer, reason, source,
                                   tensor=var.name if var is not None else "",
                                   shape=tuple(var.shape) if var is not None else ()))
    return AneReport(tuple(issues), len(ops))
