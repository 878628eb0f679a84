"""Ahead-of-time CUDA kernels for the TVM ``cuda`` target.

TVM 0.27 built without a CUDA driver (this machine) stores the generated CUDA C++ *source* in
``model.so``; the CUDA runtime compiles it when the library is loaded, by calling the Python
global ``tvm_callback_cuda_compile``. That callback needs TVM's compiler package (it reads the
current Target) and NVRTC, neither of which a deployment machine with only TVM's runtime has.

So the target compiles the kernels here, at build time, with nvcc for the target's SM
architecture (which also proves they compile), and writes the cubin beside ``model.so``.
``use_precompiled_kernels`` registers a callback that hands that cubin to the runtime when
it asks for the source the cubin was built from, and refuses any other source.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapc.errors import ToolMissingError, VerificationError

if TYPE_CHECKING:
    import tvm

__all__ = ["CUBIN", "cuda_source", "compile_kernels", "kernel_counts", "register_kernels",
           "use_precompiled_kernels"]

CUBIN = "cuda_kernels.cubin"
_KERNEL_DEFINITION = re.compile(r'extern "C" __global__[^;{]*\{')
CALLBACK = "tvm_callback_cuda_compile"


def cuda_source(executable: tvm.runtime.Executable) -> str:
    """Return the CUDA C++ source of the executable's CUDA module (raises if it has none)."""
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return str(module.inspect_source("cuda"))
        pending.extend(module.imports)
    raise VerificationError("the TVM build has no CUDA module; report this with the target used")


def source_digest(source: str) -> str:
    """Return the sha256 hex digest of a CUDA source text."""
    return hashlib.sha256(source.encode()).hexdigest()


def compile_kernels(source: str, target: tvm.target.Target, path: Path) -> dict[str, Any]:
    """Compile ``source`` to a cubin for the cuda ``target``'s arch (e.g. sm_90) with nvcc
    into ``path``.

    Returns what the manifest records (file, arch, compiler, source digest, kernel count).
    Raises ToolMissingError without nvcc, VerificationError when a kernel does not compile."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ToolMissingError("the cuda target compiles its kernels ahead of time with nvcc, "
                               "which is not on PATH: install the CUDA toolkit (or add its bin/ "
                               "to PATH)")
    from tvm.support import nvcc as tvm_nvcc

    arch = str(target.attrs["arch"])
    try:
        with target:  # TVM's nvcc wrapper reads the compute version from the current target
            cubin = tvm_nvcc.compile_cuda(source, target_format="cubin", arch=arch,
                                          compiler="nvcc")
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise VerificationError(f"nvcc could not compile the CUDA kernels for {arch}: "
                                f"{first[-1] if first else exc}; artifact not written") from exc
    path.write_bytes(bytes(cubin))
    return {"file": path.name, "arch": arch, "compiler": nvcc, "bytes": len(cubin),
            "source_sha256": source_digest(source), **kernel_counts(source)}


def kernel_counts(source: str) -> dict[str, int]:
    """Return how many kernels a CUDA source defines (its forward declarations not counted)
    and how many of those use tensor cores (WMMA ``mma_sync``)."""
    starts = [m.start() for m in _KERNEL_DEFINITION.finditer(source)]
    bodies = [source[a:b] for a, b in zip(starts, [*starts[1:], len(source)], strict=True)]
    return {"kernels": len(bodies),
            "tensor_core_kernels": sum("mma_sync" in body for body in bodies)}


def register_kernels(cubin: bytes, digest: str, label: str = "the cubin") -> None:
    """Answer the TVM runtime's CUDA compile callback with ``cubin`` for the source whose
    sha256 is ``digest``; any other source raises (naming ``label``). Returns nothing."""
    import tvm_ffi

    def compile_callback(source: str) -> bytes:
        if source_digest(str(source)) != digest:
            raise RuntimeError(f"{label} was built from another CUDA source; rebuild the "
                               "artifact with the same snapc and TVM versions")
        return cubin

    tvm_ffi.register_global_func(CALLBACK, compile_callback, override=True)


def use_precompiled_kernels(folder: Path | str) -> Path:
    """Register the artifact folder's cubin (by its manifest) for the TVM runtime's CUDA
    compile callback; call it before loading ``model.so``. Returns the cubin path."""
    import json

    folder = Path(folder)
    info = json.loads((folder / "manifest.json").read_text())["extra"]["tvm"]["cuda_kernels"]
    cubin_path = folder / info["file"]
    register_kernels(cubin_path.read_bytes(), info["source_sha256"], str(cubin_path))
    return cubin_path
