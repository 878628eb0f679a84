"""snapc's TVM target names and the Apache TVM target each one maps to.

=========  ==========================================================  =====================
snapc      TVM target (apache-tvm 0.27 dict or tag)                    host
=========  ==========================================================  =====================
adreno     tag ``qcom/adreno-opencl-texture`` (NCHW4c textures), or    aarch64 android/linux
           ``qcom/adreno-opencl`` (buffers) when the texture pipeline
           fails; Relax Adreno pipeline + Adreno/GPU dlight schedules
mali       ``{"kind": "opencl", "device": "mali"}``; generic GPU       aarch64 android/linux
           pipeline + dlight GPU schedules
arm-cpu    ``{"kind": "llvm", "mtriple": <aarch64>, "mattr": ["+neon"]}``  (itself)
x86        ``{"kind": "llvm", "mtriple": "x86_64-linux-gnu"}``         (itself)
cuda       ``{"kind": "cuda", "arch": "sm_90"}`` (H100 by default)     x86_64-linux-gnu
=========  ==========================================================  =====================

The aarch64 host triple follows the linker that is present: ``aarch64-linux-android`` with an
Android NDK compiler (``TVM_NDK_CC``), else ``aarch64-linux-gnu`` with ``aarch64-linux-gnu-g++``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from snapc.errors import ToolMissingError, UnknownNameError

__all__ = ["TvmTargetSpec", "TVM_TARGETS", "target_spec", "Toolchain", "find_toolchain"]

GNU_CROSS_CXX = "aarch64-linux-gnu-g++"
NDK_ENV = "TVM_NDK_CC"


@dataclass(frozen=True)
class TvmTargetSpec:
    """One snapc TVM target: its device kind, TVM target and defaults.

    ``device`` is "opencl", "cpu" or "cuda"; ``tvm_tag`` or ``tvm_dict`` names the TVM target
    without its host; ``aarch64`` says the artifact is cross-compiled for an aarch64 device;
    ``runs_here`` says verification can run the artifact on this machine's CPU.
    """

    name: str
    device: str
    description: str
    default_precision: str
    aarch64: bool
    tvm_tag: str | None = None
    tvm_dict: dict[str, Any] | None = None
    texture_tag: str | None = None


TVM_TARGETS: dict[str, TvmTargetSpec] = {
    "adreno": TvmTargetSpec(
        "adreno", "opencl", "Qualcomm Adreno GPU through OpenCL (Relax Adreno pipeline)",
        "fp16", aarch64=True, tvm_tag="qcom/adreno-opencl",
        texture_tag="qcom/adreno-opencl-texture"),
    "mali": TvmTargetSpec(
        "mali", "opencl", "Arm Mali GPU through OpenCL (generic GPU dlight schedules)",
        "fp16", aarch64=True, tvm_dict={"kind": "opencl", "device": "mali"}),
    "arm-cpu": TvmTargetSpec(
        "arm-cpu", "cpu", "aarch64 CPU, LLVM with NEON", "fp32", aarch64=True,
        tvm_dict={"kind": "llvm", "mattr": ["+neon"]}),
    "x86": TvmTargetSpec(
        "x86", "cpu", "x86-64 CPU, LLVM (runs here; verified against PyTorch)", "fp32",
        aarch64=False, tvm_dict={"kind": "llvm", "mtriple": "x86_64-linux-gnu"}),
    "cuda": TvmTargetSpec(
        "cuda", "cuda", "NVIDIA GPU, CUDA with dlight GPU schedules (x86-64 host)", "fp32",
        aarch64=False, tvm_dict={"kind": "cuda"}),
}


def target_spec(name: str) -> TvmTargetSpec:
    """Return the spec of snapc TVM target ``name``; raise UnknownNameError listing the valid."""
    try:
        return TVM_TARGETS[name]
    except KeyError:
        raise UnknownNameError("TVM target", name, list(TVM_TARGETS)) from None


@dataclass(frozen=True)
class Toolchain:
    """The C++ driver that links ``model.so`` and the LLVM triple its objects need."""

    compiler: str
    triple: str
    os: str

    def to_json(self) -> dict[str, str]:
        """Return a JSON-ready dict."""
        return {"compiler": self.compiler, "triple": self.triple, "os": self.os}


def find_toolchain(host_os: str = "auto") -> Toolchain:
    """Return the aarch64 toolchain to link with: the NDK compiler named by ``TVM_NDK_CC``
    (Android), else ``aarch64-linux-gnu-g++`` (Linux). ``host_os`` "android" or "linux"
    insists on one. Raises ToolMissingError naming both when the one needed is absent."""
    # TVM_NDK_CC is TVM's own convention for naming the NDK compiler; it is read here, at the
    # edge, and recorded in the manifest, never consulted by a pass.
    ndk = os.environ.get(NDK_ENV)
    if host_os in ("auto", "android") and ndk:
        if shutil.which(ndk) is None:
            raise ToolMissingError(f"{NDK_ENV}={ndk} is not an executable; point it at the NDK's "
                                   "aarch64-linux-android<API>-clang++")
        return Toolchain(ndk, "aarch64-linux-android", "android")
    if host_os in ("auto", "linux") and shutil.which(GNU_CROSS_CXX):
        return Toolchain(GNU_CROSS_CXX, "aarch64-linux-gnu", "linux")
    if host_os == "android":
        raise ToolMissingError(f"an Android build needs an NDK compiler: set {NDK_ENV} to the "
                               "NDK's aarch64-linux-android<API>-clang++")
    raise ToolMissingError(
        f"no aarch64 linker: set {NDK_ENV} to an Android NDK aarch64-linux-android<API>-clang++ "
        f"or install {GNU_CROSS_CXX} (scripts/setup_tvm.sh installs it)")
