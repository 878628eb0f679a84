"""Vendor-library offload of the TVM targets through TVM's BYOC partitioning (target option
``offload``): cuBLAS / cuDNN on ``cuda``, CLML on ``adreno``, DNNL on ``x86``.

Each library is a Relax pattern partition (``partition_for_*`` in ``tvm.relax.backend``) that
marks matching subgraphs for an external codegen, then ``relax.transform.RunCodegen`` hands them
to the codegen TVM registers as ``relax.ext.<name>`` when it was built with that library
(``USE_CUBLAS``, ``USE_CUDNN``, ``USE_CLML``, ``USE_DNNL``). The pip wheel of apache-tvm
0.27.0.post1 was built with none of them (``tvm.support.libinfo()``; no ``relax.ext.*``
codegen is registered) and has no Relax DNNL partition at all, so ``check_offload`` turns every
offload into a one-line error naming the missing piece instead of building without it. With a
TVM built from source with the library on, the same option partitions and builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapc.errors import SnapcError, ToolMissingError, UnknownNameError

if TYPE_CHECKING:
    import tvm

__all__ = ["Offload", "OFFLOADS", "check_offload", "partition"]


@dataclass(frozen=True)
class Offload:
    """One library: the snapc targets it serves, TVM's codegen name, its partition function
    (``module:function`` under ``tvm.relax.backend``, None when TVM has none) and build flag."""

    name: str
    targets: tuple[str, ...]
    codegen: str
    partition: str | None
    cmake_flag: str


OFFLOADS: dict[str, Offload] = {
    "cublas": Offload("cublas", ("cuda",), "cublas", "cuda.cublas:partition_for_cublas",
                      "USE_CUBLAS"),
    "cudnn": Offload("cudnn", ("cuda",), "cudnn", "cuda.cudnn:partition_for_cudnn",
                     "USE_CUDNN"),
    "clml": Offload("clml", ("adreno",), "openclml", "adreno.clml:OpenCLMLOffLoad",
                    "USE_CLML"),
    "dnnl": Offload("dnnl", ("x86",), "dnnl", None, "USE_DNNL"),
}


def check_offload(name: str, target: str) -> Offload:
    """Return the Offload ``name`` after checking that it serves snapc target ``target`` and that
    this TVM can build it; raise a one-line SnapcError / ToolMissingError otherwise."""
    import tvm

    if name not in OFFLOADS:
        raise UnknownNameError("offload library", name, list(OFFLOADS))
    entry = OFFLOADS[name]
    if target not in entry.targets:
        raise SnapcError(f"offload {name} serves target {', '.join(entry.targets)}, not "
                         f"{target}; drop --offload or pick a library of {target}: "
                         + (", ".join(k for k, v in OFFLOADS.items() if target in v.targets)
                            or "none"))
    version = tvm.__version__
    if entry.partition is None:
        raise ToolMissingError(f"apache-tvm {version} has no Relax {name} partitioning "
                               "(only the removed Relay flow had it); drop --offload")
    if tvm.get_global_func(f"relax.ext.{entry.codegen}", allow_missing=True) is None:
        raise ToolMissingError(
            f"this apache-tvm {version} was built without {name} ({entry.cmake_flag}=OFF, no "
            f"relax.ext.{entry.codegen} codegen): build TVM from source with "
            f"{entry.cmake_flag}=ON, or drop --offload")
    return entry


def partition(module: tvm.ir.IRModule, entry: Offload) -> tvm.ir.IRModule:
    """Return ``module`` with ``entry``'s subgraphs partitioned and compiled by its codegen
    (``RunCodegen``); the rest is left for the Relax pipeline. Requires ``check_offload``."""
    import importlib

    from tvm import relax

    where, _, func = (entry.partition or "").partition(":")
    found = getattr(importlib.import_module(f"tvm.relax.backend.{where}"), func)
    # CLML ships a pass class (it runs RunCodegen itself; a second RunCodegen finds nothing)
    partitioned = found()(module) if isinstance(found, type) else found(module)
    return relax.transform.RunCodegen()(partitioned)
