"""Check TVM's generated OpenCL with a real OpenCL compiler (PoCL through pyopencl).

Two checks, both on an OpenCL device of this machine (PoCL's CPU device in CI):

* ``compile_kernels``: every kernel of a build is compiled; a failure names the kernels whose
  lines the compiler rejected (from the build log's ``<source>:LINE:COL: error``).
* ``run_kernel_sample``: a few scheduled fp32 kernels (conv, matmul, norm, softmax first) run
  with the launch sizes of TVM's schedule (``T.launch_thread`` extents after TVM's TIR
  pipeline) on random inputs, and their outputs are compared with an x86 LLVM build of the same
  fused TIR function before scheduling.

PoCL's CPU device has no ``cl_khr_fp16``; the caller decides which build to check
(``fp16_device``) and records it.

Requires: ``pyopencl`` and an OpenCL ICD (``pocl-opencl-icd``; scripts/setup_tvm.sh).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from snapc.errors import ToolMissingError
from snapc.numerics import Numerics, compare

if TYPE_CHECKING:
    import pyopencl
    import tvm

    from snapc.targets.tvm_build import Lowered

__all__ = ["CompileReport", "KernelRun", "opencl_device", "device_source", "kernel_names",
           "compile_kernels", "run_kernel_sample", "SAMPLE_PREFERENCE"]

# Which fused functions to run first: the op classes that dominate a UNet.
SAMPLE_PREFERENCE = ("conv2d", "matmul", "group_norm", "softmax", "layer_norm")
_KERNEL_DEF = re.compile(r"__kernel\s+void\s+(?:__attribute__\(\([^)]*\)\)\s*)?(\w+)\s*\(([^)]*)\)")
# clang writes "<file>:LINE:COL: error: MSG"; PoCL writes "error: <file>:LINE:COL: MSG".
_ERROR_LINE = re.compile(r"^(?:error: [^\s:]*:(\d+):\d+: (.*)|[^\s:]*:(\d+):\d+: "
                         r"(?:fatal )?error: (.*))$", re.MULTILINE)
_LAUNCH = re.compile(r'T\.launch_thread\("(\w+)\.(\w)",\s*(?:T\.int64\()?(\d+)')


@dataclass(frozen=True)
class CompileReport:
    """Result of compiling one build's OpenCL source: kernel names and rejected kernels."""

    device: str
    kernels: list[str]
    failures: dict[str, str]
    seconds: float

    @property
    def ok(self) -> bool:
        """Return True when every kernel compiled."""
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"device": self.device, "kernels": len(self.kernels),
                "compiled": len(self.kernels) - len(self.failures),
                "failed": dict(self.failures), "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class KernelRun:
    """One scheduled kernel run on OpenCL against the x86 build of the same TIR function."""

    kernel: str
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]
    numerics: Numerics | None
    skipped: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        out: dict[str, Any] = {"kernel": self.kernel, "global_size": list(self.global_size),
                               "local_size": list(self.local_size)}
        if self.numerics is not None:
            out.update(self.numerics.to_json())
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def opencl_device(fp16: bool = False) -> pyopencl.Device | None:
    """Return the first OpenCL device (with ``cl_khr_fp16`` when ``fp16``), or None.

    Raises ToolMissingError when pyopencl or every OpenCL platform is missing."""
    try:
        import pyopencl as cl
    except ImportError as exc:
        raise ToolMissingError("the OpenCL kernel check needs pyopencl: pip install "
                               "'snapc[tvm]' and run scripts/setup_tvm.sh") from exc
    try:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as exc:
        raise ToolMissingError(f"no OpenCL platform ({exc}); install pocl-opencl-icd with "
                               "scripts/setup_tvm.sh") from exc
    if not devices:
        raise ToolMissingError("no OpenCL device; install pocl-opencl-icd with "
                               "scripts/setup_tvm.sh")
    for device in devices:
        if not fp16 or "cl_khr_fp16" in device.extensions.split():
            return device
    return None


def _host_x86(target: tvm.target.Target) -> tvm.target.Target:
    import json

    import tvm

    spec = json.loads(str(target))
    spec.pop("host", None)
    return tvm.target.Target(spec, host={"kind": "llvm"})


def _device_module(functions: tvm.ir.IRModule, target: tvm.target.Target) -> tvm.ir.IRModule:
    """Return the device-kernel TIR of ``functions`` after TVM's TIR pipeline and split."""
    import tvm
    from tvm.tirx.build import split_host_device_mods

    target = _host_x86(target)
    module = tvm.tirx.transform.BindTarget(target)(functions)
    # tvm.compile's own choice (tir_pipeline="default"), so the kernels match the build's.
    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline("default")
    with tvm.transform.PassContext(opt_level=3):
        _, devices = split_host_device_mods(pipeline(module))
        merged = tvm.IRModule({})
        for device_mod in devices.values():
            merged.update(finalize_device()(device_mod))
    return merged


def device_source(lowered: Lowered) -> str:
    """Return the OpenCL source of every kernel of ``lowered`` without compiling host code
    (for a twin build that is checked, never shipped)."""
    import tvm
    from tvm.tirx.build import codegen_build

    tir = tvm.IRModule({gv: f for gv, f in lowered.module.functions_items()
                        if isinstance(f, tvm.tirx.PrimFunc)})
    with tvm.transform.PassContext(opt_level=3):
        return codegen_build(_device_module(tir, lowered.target),
                             _host_x86(lowered.target)).inspect_source()


def kernel_names(source: str) -> list[str]:
    """Return the names of the kernels defined (not only declared) in ``source``."""
    return sorted({m.group(1) for m in _KERNEL_DEF.finditer(source)
                   if source[m.end():m.end() + 8].lstrip().startswith("{")})


def _kernel_at_lines(source: str) -> list[tuple[int, str]]:
    starts = []
    for m in _KERNEL_DEF.finditer(source):
        if source[m.end():m.end() + 8].lstrip().startswith("{"):
            starts.append((source.count("\n", 0, m.start()) + 1, m.group(1)))
    return starts


def _blame(source: str, log: str) -> dict[str, str]:
    """Return {kernel name: first error} for the error lines of a build log."""
    starts = _kernel_at_lines(source)
    blamed: dict[str, str] = {}
    for m in _ERROR_LINE.finditer(log):
        line, message = int(m.group(1) or m.group(3)), m.group(2) or m.group(4)
        owner = next((name for start, name in reversed(starts) if start <= line),
                     "(before the first kernel)")
        blamed.setdefault(owner, f"line {line}: {message}")
    return blamed or {"(unknown kernel)": log.strip().splitlines()[-1][:300] if log.strip()
                      else "build failed with an empty log"}


def compile_kernels(source: str, device: pyopencl.Device) -> tuple[CompileReport,
                                                                    pyopencl.Program | None]:
    """Compile every kernel of ``source`` on ``device``; return the report and the built
    program (None when any kernel failed; the report names them)."""
    import time

    import pyopencl as cl

    start = time.perf_counter()
    names = kernel_names(source)
    context = cl.Context([device])
    try:
        program = cl.Program(context, source).build()
    except cl.RuntimeError as exc:
        return CompileReport(device.name, names, _blame(source, str(exc)),
                             time.perf_counter() - start), None
    built = {k.function_name for k in program.all_kernels()}
    missing = {n: "not in the built program" for n in names if n not in built}
    return CompileReport(device.name, names, missing, time.perf_counter() - start), program


def _launch_sizes(kernel: tvm.tirx.PrimFunc) -> tuple[tuple[int, ...], tuple[int, ...]]:
    extents = {"blockIdx": [1, 1, 1], "threadIdx": [1, 1, 1]}
    for scope, axis, extent in _LAUNCH.findall(kernel.script()):
        if scope in extents:
            extents[scope]["xyz".index(axis)] = int(extent)
    local = tuple(extents["threadIdx"])
    return tuple(b * t for b, t in zip(extents["blockIdx"], local, strict=True)), local


def _sample(names: list[str], count: int) -> list[str]:
    chosen: list[str] = []
    for op in SAMPLE_PREFERENCE:
        match = next((n for n in names if op in n and n not in chosen), None)
        if match and len(chosen) < count:
            chosen.append(match)
    chosen += [n for n in names if n not in chosen][:count - len(chosen)]
    return chosen


def _random_args(function: tvm.tirx.PrimFunc, rng: np.random.Generator) -> list[np.ndarray]:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    arrays = []
    for info in ArgInfo.from_prim_func(function):
        shape = tuple(int(d) for d in info.shape)
        dtype = np.dtype(str(info.dtype))
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 1000, shape).astype(dtype))
    return arrays


def _run_one(name: str, lowered: Lowered, program: pyopencl.Program, source: str,
             rng: np.random.Generator) -> KernelRun:
    import pyopencl as cl
    import tvm

    scheduled = lowered.module[name].with_attr("global_symbol", name)
    kernels = list(_device_module(tvm.IRModule({name: scheduled}), lowered.target)
                   .functions_items())
    if len(kernels) != 1:
        return KernelRun(name, (), (), None, f"lowers to {len(kernels)} kernels")
    kernel_name = kernels[0][0].name_hint
    global_size, local_size = _launch_sizes(kernels[0][1])
    declared = {m.group(1): m.group(2) for m in _KERNEL_DEF.finditer(source)}
    if kernel_name not in declared:
        return KernelRun(kernel_name, global_size, local_size, None, "not in the build")
    arg_names = [a.split()[-1].removesuffix("_ptr") for a in declared[kernel_name].split(",")]
    unscheduled = lowered.unscheduled[name]
    param_names = [p.name for p in unscheduled.params]
    if sorted(arg_names) != sorted(param_names):
        return KernelRun(kernel_name, global_size, local_size, None,
                         "kernel arguments are not the function's buffers")
    inputs = _random_args(unscheduled, rng)
    reference = tvm.tirx.build(tvm.IRModule({"main": unscheduled.with_attr("global_symbol",
                                                                            "main")}),
                               target="llvm")
    ref_tensors = [tvm.runtime.tensor(a) for a in inputs]
    reference["main"](*ref_tensors)
    ref_out = [t.numpy() for t in ref_tensors]
    written = [i for i, (a, b) in enumerate(zip(inputs, ref_out, strict=True))
               if not np.array_equal(a, b)] or [len(inputs) - 1]

    context = program.context
    queue = cl.CommandQueue(context)
    flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
    buffers = {n: cl.Buffer(context, flags, hostbuf=a) for n, a in zip(param_names, inputs,
                                                                      strict=True)}
    getattr(program, kernel_name)(queue, global_size, local_size,
                                  *(buffers[n] for n in arg_names))
    numerics = []
    for i in written:
        out = np.empty_like(inputs[i])
        cl.enqueue_copy(queue, out, buffers[param_names[i]])
        numerics.append(compare(ref_out[i], out))
    queue.finish()
    worst = min(numerics, key=lambda n: n.psnr_db)
    return KernelRun(kernel_name, global_size, local_size, worst)


def run_kernel_sample(lowered: Lowered, program: pyopencl.Program, source: str,
                      count: int = 4, seed: int = 0) -> list[KernelRun]:
    """Run ``count`` scheduled kernels of ``lowered`` (an fp32 GPU build whose OpenCL
    ``source`` was built into ``program``) and return each one's numerics against the x86
    LLVM build of the same unscheduled TIR function, on seeded random inputs."""
    import tvm

    if lowered.unscheduled is None:
        return []
    names = sorted(gv.name_hint for gv, f in lowered.unscheduled.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc))
    rng = np.random.default_rng(seed)
    return [_run_one(name, lowered, program, source, rng) for name in _sample(names, count)]
