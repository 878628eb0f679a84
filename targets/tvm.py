"""TVM target: a Graph through Apache TVM Relax to an aarch64 (or x86/CUDA) shared library.

``export`` imports the graph with ``from_exported_program`` (fp32, weights kept as inputs),
converts to fp16 compute when asked (``ToMixedPrecision``), runs TVM's Relax pipeline for the
target with dlight default GPU schedules, compiles, and writes:

* ``model.so``: the VM executable, cross-compiled for aarch64 (Android NDK via ``TVM_NDK_CC``
  or ``aarch64-linux-gnu-g++``) or built for x86-64;
* ``params.safetensors``: the weights, in the order of ``manifest.extra.tvm.param_order``;
* ``run_on_device.py``: loads the folder on a device through TVM RPC and times it;
* ``manifest.json`` (written by the caller from the returned Manifest).

Verification always runs; what it can do depends on the target:

* ``x86``: the written model.so and weights run here and must reach ``min_psnr_db`` against
  PyTorch. ``cuda``: the kernels are compiled here to a cubin with nvcc (``cuda_kernels.cubin``,
  see snapc.targets.tvm_cuda), then run as for x86 on a CUDA device; without one they are
  not run, and the manifest says so. ``arm-cpu``: built and linked only.
* ``mali``/``adreno``: every OpenCL kernel is compiled by a real OpenCL compiler (PoCL); an fp16
  build is checked through its fp32 twin (same graph and pipeline) when no device has
  ``cl_khr_fp16``, and the manifest says which; a sample of fp32 kernels runs with TVM's launch
  sizes and must match the x86 build of the same function. Any failure raises
  VerificationError naming the kernels, and no artifact is written.

Requires: apache-tvm 0.27 (``pip install 'snapc[tvm]'``), and for OpenCL targets pyopencl plus
an OpenCL ICD (scripts/setup_tvm.sh).
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from snapc.errors import SnapcError, ToolMissingError, VerificationError
from snapc.manifest import Manifest, versions
from snapc.numerics import compare
from snapc.targets.tvm_targets import TvmTargetSpec, find_toolchain, target_spec

if TYPE_CHECKING:
    import tvm

    from snapc.graph import Graph
    from snapc.targets.tvm_build import Imported, Lowered
    from snapc.targets.tvm_targets import Toolchain

__all__ = ["TvmOptions", "export", "TEXTURE_FALLBACK_WARNING"]

LIBRARY, PARAMS, SCRIPT = "model.so", "params.safetensors", "run_on_device.py"
TEXTURE_FALLBACK_WARNING = ("Adreno texture pipeline ({tag}, NCHW4c) {reason}; built the "
                            "buffer path {fallback} instead")
TENSOR_CORES_OFF = ("CUDA fp16 matmuls use dlight's SIMT schedule, not tensor cores "
                    "(--tensor-cores builds dlight's MMA schedules)")
TENSOR_CORES_FALLBACK_WARNING = ("dlight's tensor-core (MMA) schedules {reason}; built SIMT "
                                 "matmuls instead")
ENTRY = "main"
KERNEL_PSNR_DB = 60.0  # fp32 kernels vs x86: only summation order differs


@dataclass(frozen=True)
class TvmOptions:
    """Options of the TVM targets.

    ``target``: a snapc TVM target name (adreno, mali, arm-cpu, x86, cuda).
    ``precision``: "fp16" or "fp32"; None takes the target's default (fp16 on mobile GPUs).
    ``host_os``: "auto", "android" or "linux": which aarch64 toolchain links model.so.
    ``texture``: on adreno, try the texture pipeline first (in a subprocess).
    ``cuda_arch``: the SM architecture of the cuda target (sm_90 is H100).
    ``min_psnr_db``: gate for runs against PyTorch; None means 60 dB fp32, 30 dB fp16.
    ``kernel_sample``: how many OpenCL kernels run on PoCL against x86.
    ``tensor_cores``: on cuda at fp16, let dlight tensorize the matmuls and convolutions for
    tensor cores (WMMA, fp32 accumulation), first in a child process (snapc.targets.tvm_probe):
    that path crashed TVM 0.27 with apache-tvm-ffi 0.1.15 (SIGSEGV in ``ToJSONGraph`` from
    ``s_tir`` Tensorize; the pinned 0.1.14 survives), so a crash falls back to SIMT with a
    warning. Off by default until a GPU run has verified and timed it.
    ``tuning``: a records folder from ``snapc tune`` for this target; its tuned kernels are
    applied (snapc.targets.tvm_tuning), the rest keep the default schedules.
    ``offload``: a vendor library for the heavy operators (cublas, cudnn, clml, dnnl; see
    snapc.targets.tvm_offload), refused when this TVM cannot build it.
    ``mcpu``: the LLVM CPU of the cpu targets (``native`` is this machine's); None: generic.
    ``cpu_schedules``: on the cpu targets, snapc's default schedules for the kernels no tuning
    record covers (snapc.targets.tvm_cpu_schedule); False builds TVM's naive loop nests.
    ``fast_math``: on the cpu targets, vectorizable approximations of exp / erf and the
    activations on them (snapc.targets.tvm_fast_math); False keeps the scalar libm calls.
    """

    target: str = "x86"
    precision: str | None = None
    host_os: str = "auto"
    texture: bool = True
    cuda_arch: str = "sm_90"
    min_psnr_db: float | None = None
    kernel_sample: int = 4
    tensor_cores: bool = False
    tuning: str | None = None
    offload: str | None = None
    mcpu: str | None = None
    cpu_schedules: bool = True
    fast_math: bool = True

    def check(self) -> None:
        """Raise a one-line SnapcError for a bad target, offload library or records folder."""
        spec = target_spec(self.target)
        if self.mcpu is not None and spec.device != "cpu":
            raise SnapcError(f"mcpu applies to the cpu targets (x86, arm-cpu), not {spec.name}")
        if self.precision not in (None, "fp16", "fp32"):
            raise SnapcError(f"precision must be fp16 or fp32, got '{self.precision}'")
        if self.tensor_cores and spec.device != "cuda":
            raise SnapcError(f"tensor cores apply to the cuda target, not {spec.name}")
        if self.tensor_cores and (self.precision or spec.default_precision) != "fp16":
            raise SnapcError("tensor cores need fp16 compute: add --precision fp16")
        if self.offload is None and self.tuning is None:
            return
        _check_tvm()
        if self.offload is not None:
            from snapc.targets.tvm_offload import check_offload

            check_offload(self.offload, spec.name)
        if self.tuning is not None:
            from snapc.targets.tvm_tuning import check_ffi, check_records

            check_ffi()
            toolchain = find_toolchain(self.host_os) if spec.aarch64 else None
            check_records(Path(self.tuning), spec.name, _tvm_target(spec, toolchain, self))


def _llvm_cpu(name: str) -> str:
    import tvm

    return tvm.target.codegen.llvm_get_system_cpu() if name == "native" else name


def _tvm_target(spec: TvmTargetSpec, toolchain: Toolchain | None,
                options: TvmOptions) -> tvm.target.Target:
    import tvm

    if spec.device == "cpu":
        attrs = dict(spec.tvm_dict or {})
        if toolchain is not None:
            attrs["mtriple"] = toolchain.triple
        if options.mcpu is not None:
            attrs["mcpu"] = _llvm_cpu(options.mcpu)
        return tvm.target.Target(attrs)
    host = {"kind": "llvm", "mtriple": toolchain.triple if toolchain else "x86_64-linux-gnu"}
    if spec.device == "cuda":
        return tvm.target.Target({**(spec.tvm_dict or {}), "arch": options.cuda_arch},
                                 host=host)
    if spec.tvm_tag:
        return tvm.target.Target(spec.tvm_tag, host=host)
    return tvm.target.Target(spec.tvm_dict, host=host)


def _lower_for(spec: TvmTargetSpec, graph: Graph, built: Imported, precision: str,
               target: tvm.target.Target, options: TvmOptions, notes: list[str],
               database: Any = None) -> tuple[Lowered, tvm.target.Target]:
    """Return the lowered module and the TVM target used; on adreno probe textures first
    (not with tuning records: they were tuned for the buffer target)."""
    import tvm

    from snapc.targets.tvm_build import lower
    from snapc.targets.tvm_probe import probe_isolated

    if spec.texture_tag and options.texture and database is None:
        texture = tvm.target.Target(spec.texture_tag, host=target.host)
        probe = probe_isolated(graph.program, precision, texture)
        if probe.ok:
            return lower(built.module, texture), texture
        message = TEXTURE_FALLBACK_WARNING.format(tag=spec.texture_tag, reason=probe.reason,
                                                  fallback=spec.tvm_tag)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        notes.append(message)
    tensor_cores = spec.device == "cuda" and precision == "fp16" and options.tensor_cores
    if tensor_cores:
        probe = probe_isolated(graph.program, precision, target, tensor_cores=True)
        if not probe.ok:
            message = TENSOR_CORES_FALLBACK_WARNING.format(reason=probe.reason)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            notes.append(message)
            tensor_cores = False
    elif spec.device == "cuda" and precision == "fp16":
        notes.append(TENSOR_CORES_OFF)
    return lower(built.module, target, tensor_cores=tensor_cores,
                 database=database, cpu_schedules=options.cpu_schedules,
                 fast_math=options.fast_math), target


def _write_library(executable: tvm.runtime.Executable, path: Path,
                   toolchain: Toolchain | None) -> None:
    from tvm.support import cc

    if toolchain is None:
        executable.export_library(str(path))
    else:
        executable.export_library(str(path), fcompile=cc.cross_compiler(toolchain.compiler))


def _write_params(imported: Imported, path: Path) -> dict[str, str]:
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in imported.params_as_declared().items()}
    save_file(tensors, str(path))
    return {name: str(t.dtype) for name, t in tensors.items()}


def _min_psnr(options: TvmOptions, precision: str) -> float:
    if options.min_psnr_db is not None:
        return options.min_psnr_db
    return 60.0 if precision == "fp32" else 30.0


def _run_here(folder: Path, graph: Graph, imported: Imported, device: tvm.runtime.Device,
              min_psnr_db: float, original: Graph) -> dict[str, Any]:
    """Load the written model.so and weights, run them on ``device`` and compare with
    ``graph`` in PyTorch (and with ``original``, the unquantized graph, when it differs)."""
    import tvm
    from safetensors.numpy import load_file
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / LIBRARY)), device)
    weights = load_file(str(folder / PARAMS))
    args = [tvm.runtime.tensor(t.detach().cpu().numpy(), device) for t in graph.example_inputs]
    args += [tvm.runtime.tensor(weights[n], device) for n in imported.param_names]
    output = vm[ENTRY](*args).numpy()
    numerics = compare(graph.example_output, output)
    quantized = original is not graph
    reference = ("torch, the same graph with its weights dequantized from the stored codes "
                 "(fp32, CPU)" if quantized else "torch (same graph, fp32, CPU)")
    result = {"reference": reference, "runtime": f"TVM VM on {device}",
              "artifact": "the written model.so and params.safetensors",
              "inputs": "the graph's example inputs", "min_psnr_db": min_psnr_db,
              "passed": numerics.passes(min_psnr_db), **numerics.to_json()}
    if quantized:
        result["vs_fp32"] = compare(original.example_output, output).to_json()
    if not result["passed"]:
        raise VerificationError(
            f"TVM output PSNR {numerics.psnr_db:.1f} dB < {min_psnr_db} dB vs PyTorch "
            f"(max abs err {numerics.max_abs:.3g}); artifact not written")
    return result


def _compile_or_raise(source: str, device: Any) -> tuple[dict[str, Any], Any]:
    from snapc.targets.tvm_opencl_check import compile_kernels

    report, program = compile_kernels(source, device)
    if not report.ok:
        listed = "; ".join(f"{k}: {v}" for k, v in list(report.failures.items())[:10])
        raise VerificationError(f"{len(report.failures)} of {len(report.kernels)} OpenCL "
                                f"kernels do not compile on {device.name}: {listed}; "
                                "artifact not written")
    return report.to_json(), program


def _check_opencl(lowered: Lowered, executable: tvm.runtime.Executable, twin: Lowered | None,
                  options: TvmOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """Compile every kernel on an OpenCL device and run a sample; raise on any failure.

    ``twin`` is the fp32 lowering of an fp16 build (None for an fp32 build): its kernels are
    compiled instead when no device has cl_khr_fp16, and always supply the kernel runs."""
    from snapc.targets.tvm_opencl_check import device_source, opencl_device, run_kernel_sample

    result: dict[str, Any] = {"compiler": "OpenCL C compiler of the device (pyopencl)"}
    fp16_device = opencl_device(fp16=True) if twin is not None else None
    if twin is None or fp16_device is not None:
        device = fp16_device or opencl_device()
        progress(f"compiling every OpenCL kernel of the artifact on {device.name}")
        result["checked_build"] = "the artifact's own kernels"
        result["compile"], program = _compile_or_raise(_opencl_source(executable), device)
    if twin is None:
        fp32, source = lowered, _opencl_source(executable)
    else:
        progress("generating the fp32 twin's OpenCL")
        fp32, source, device = twin, device_source(twin), opencl_device()
        progress(f"compiling every OpenCL kernel of the fp32 twin on {device.name}")
        twin_report, program = _compile_or_raise(source, device)
        if fp16_device is None:
            result["checked_build"] = ("the fp32 twin of the same graph and pipeline: no "
                                       "OpenCL device here has cl_khr_fp16, so the fp16 "
                                       "kernels were not compiled")
            result["compile"] = twin_report
        else:
            result["twin_compile"] = twin_report
    progress(f"running {options.kernel_sample} fp32 kernels on {device.name} against x86")
    runs = run_kernel_sample(fp32, program, source, options.kernel_sample)
    result["kernel_runs"] = [r.to_json() for r in runs]
    bad = [r for r in runs if r.numerics is not None and not r.numerics.passes(KERNEL_PSNR_DB)]
    if bad:
        raise VerificationError("OpenCL kernels differ from the x86 build: " + "; ".join(
            f"{r.kernel} {r.numerics.psnr_db:.1f} dB" for r in bad) + "; artifact not written")
    if not any(r.numerics is not None for r in runs):
        raise VerificationError("no sampled OpenCL kernel could run against x86; "
                                "artifact not written")
    result["kernel_run_min_psnr_db"] = KERNEL_PSNR_DB
    result["passed"] = True
    return result


def _opencl_source(executable: tvm.runtime.Executable) -> str:
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "opencl":
            return module.inspect_source()
        pending.extend(module.imports)
    raise SnapcError("the TVM build has no OpenCL module; report this with the target used")


def _cuda_kernels(executable: tvm.runtime.Executable, target: tvm.target.Target,
                  out_dir: Path) -> dict[str, Any]:
    """Compile the build's CUDA kernels to a cubin in ``out_dir`` and register it for loading
    (TVM 0.27 without a CUDA driver stores kernel source; see snapc.targets.tvm_cuda)."""
    from snapc.targets.tvm_cuda import CUBIN, compile_kernels, cuda_source, register_kernels

    source = cuda_source(executable)
    info = compile_kernels(source, target, out_dir / CUBIN)
    register_kernels((out_dir / CUBIN).read_bytes(), info["source_sha256"], CUBIN)
    return info


def _cuda_device_here() -> tvm.runtime.Device | None:
    import tvm

    device = tvm.cuda(0)
    return device if device.exist else None


def _verify(spec: TvmTargetSpec, folder: Path, graph: Graph, imported: Imported,
            lowered: Lowered, executable: tvm.runtime.Executable, twin: Lowered | None,
            options: TvmOptions, precision: str, progress: Callable[[str], None],
            original: Graph) -> dict[str, Any]:
    import tvm

    if spec.device == "opencl":
        return _check_opencl(lowered, executable, twin, options, progress)
    min_psnr = _min_psnr(options, precision)
    if spec.name == "x86":
        progress("running model.so here against PyTorch")
        return _run_here(folder, graph, imported, tvm.cpu(0), min_psnr, original)
    if spec.device == "cuda":
        device = _cuda_device_here()
        if device is not None:
            progress("running model.so on the GPU against PyTorch")
            return _run_here(folder, graph, imported, device, min_psnr, original)
        return {"passed": None,
                "compiled": f"CUDA kernels compiled by nvcc to {options.cuda_arch} cubin",
                "ran": False, "reason": "no CUDA device on this machine; rerun the export on "
                "a GPU machine to compare with PyTorch"}
    return {"passed": None, "ran": False, "compiled": "aarch64 LLVM codegen and link",
            "reason": "an aarch64 build cannot run here; time it on the device with "
            "run_on_device.py (the same pipeline is verified by the x86 target)"}


def _check_tvm() -> str:
    try:
        import tvm
    except ImportError as exc:
        raise ToolMissingError(f"the TVM targets need apache-tvm 0.27 ({exc}); "
                               "pip install 'snapc[tvm]'") from exc
    return str(tvm.__version__)


def export(
    graph: Graph,
    out_dir: Path,
    options: TvmOptions = TvmOptions(),
    progress: Callable[[str], None] = lambda _: None,
) -> Manifest:
    """Write the TVM artifact of ``graph`` for ``options.target`` into ``out_dir`` (an empty
    folder) and return its manifest. Raises VerificationError when a check fails (the caller
    then discards the folder), ToolMissingError when TVM or a linker is missing."""
    from snapc.targets.tvm_build import (
        compile_lowered,
        import_graph,
        lower,
        target_json,
        to_fp16,
    )

    tvm_version = _check_tvm()
    spec = target_spec(options.target)
    precision = options.precision or spec.default_precision
    if precision not in ("fp16", "fp32"):
        raise SnapcError(f"precision must be fp16 or fp32, got '{precision}'")
    toolchain = find_toolchain(options.host_os) if spec.aarch64 else None
    target = _tvm_target(spec, toolchain, options)
    out_dir, notes, timings = Path(out_dir), [], {}

    quantized: dict[str, Any] = {}
    original = graph
    if graph.quant:
        from snapc.targets.tvm_quant import dequantizing_graph

        progress("storing quantized weights as integer codes (dequantized on the device)")
        graph, quantized = dequantizing_graph(graph, graph.quant)
        notes.append(f"{len(quantized)} weights stored as integer codes and dequantized in "
                     "the graph; verified against PyTorch running the same dequantization"
                     if quantized else "the quantization records have no TVM realisation "
                     "(only fp16): weights stored in the build's precision")
    progress("importing into TVM Relax (fp32)")
    imported = import_graph(graph.program)
    timings["import_s"] = imported.import_s
    built = to_fp16(imported) if precision == "fp16" else imported
    options.check()
    if options.offload is not None:
        from snapc.targets.tvm_offload import OFFLOADS, partition

        progress(f"partitioning for {options.offload}")
        built = replace(built, module=partition(built.module, OFFLOADS[options.offload]))
    database, tuning = _tuning_database(options, precision)
    progress(f"lowering for {spec.name}" + (" with tuned kernels" if database else ""))
    lowered, target = _lower_for(spec, graph, built, precision, target, options, notes,
                                 database)
    if tuning:
        tuning["applied_kernels"] = _tuned_kernels(lowered)
    timings["lower_s"] = lowered.lower_s
    progress("compiling (TIR pipeline and codegen)")
    start = time.perf_counter()
    executable = compile_lowered(lowered)
    timings["compile_s"] = time.perf_counter() - start

    start = time.perf_counter()
    _write_library(executable, out_dir / LIBRARY, toolchain)
    files = {"library": LIBRARY, "params": PARAMS, "run_on_device": SCRIPT}
    cuda_kernels = None
    if spec.device == "cuda":
        progress(f"compiling the CUDA kernels for {options.cuda_arch} (nvcc)")
        cuda_kernels = _cuda_kernels(executable, target, out_dir)
        files["cuda_kernels"] = cuda_kernels["file"]
    param_dtypes = _write_params(built, out_dir / PARAMS)
    shutil.copyfile(Path(__file__).with_name("tvm_rpc.py"), out_dir / SCRIPT)
    timings["write_s"] = time.perf_counter() - start

    start = time.perf_counter()
    twin = None
    if spec.device == "opencl" and precision == "fp16":
        progress("lowering the fp32 twin for the OpenCL check")
        twin = lower(imported.module, target)
    verification = _verify(spec, out_dir, graph, built, lowered, executable, twin, options,
                           precision, progress, original)
    timings["verify_s"] = time.perf_counter() - start
    if verification.get("passed") is None:
        notes.append(f"not verified numerically: {verification['reason']}")

    manifest = Manifest.for_graph(
        original, spec.name,
        files=files,
        target_options=asdict(options), verification=verification,
        versions=versions("apache-tvm", "pyopencl", "diffusers"), notes=notes,
        extra={"tvm": {
            "version": tvm_version, "entry": ENTRY, "device": spec.device,
            "target": target_json(target), "precision": precision,
            "relax_passes": lowered.passes, "inputs": imported.input_names,
            "tensor_cores": bool(cuda_kernels and cuda_kernels["tensor_core_kernels"]),
            "param_order": imported.param_names, "param_dtypes": param_dtypes,
            "param_sources": imported.param_sources, "param_transposed": imported.transposed,
            **({"cuda_kernels": cuda_kernels} if cuda_kernels else {}),
            **({"quantized_weights": quantized} if quantized else {}),
            **({"tuning": tuning} if tuning else {}),
            **({"offload": options.offload} if options.offload else {}),
            "toolchain": toolchain.to_json() if toolchain else {"compiler": "g++ (host)"},
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "library_bytes": (out_dir / LIBRARY).stat().st_size,
            "params_bytes": (out_dir / PARAMS).stat().st_size,
        }},
    )
    if original.quant:
        manifest.quantization["realised"] = _realised(original.quant, quantized)
    return manifest


def _tuning_database(options: TvmOptions, precision: str) -> tuple[Any, dict[str, Any]]:
    """Return (MetaSchedule database, manifest record) of ``options.tuning``, or (None, {})."""
    if options.tuning is None:
        return None, {}
    from snapc.targets.tvm_tuning import count_records, open_database, read_index

    folder = Path(options.tuning)
    index = read_index(folder)
    if index.get("precision", precision) != precision:
        raise SnapcError(f"tuning records {folder} were tuned at {index['precision']}, this "
                         f"build is {precision}; tune at {precision} or set the precision")
    workloads, records = count_records(folder)
    return open_database(folder), {
        "records": str(folder.resolve()), "device": index["device"],
        "models": index.get("models", []), "workloads": workloads, "records_count": records}


def _tuned_kernels(lowered: Lowered) -> dict[str, int]:
    """Return how many TIR kernels the tuning records scheduled, how many carry a schedule
    after lowering (tuned or default) and how many there are."""
    import tvm

    from snapc.targets.tvm_build import count_scheduled

    funcs = [f for _, f in lowered.module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return {"kernels": len(funcs), "tuned": lowered.tuned_kernels,
            "scheduled_after_lowering": count_scheduled(lowered.module)}


def _realised(records: dict[str, dict[str, Any]], quantized: dict[str, Any]) -> dict[str, Any]:
    """Return how the graph's quantization records were realised by the TVM build."""
    from collections import Counter

    from snapc.passes.quantize import NODE_PREFIX

    weights = {k: r for k, r in records.items() if not k.startswith(NODE_PREFIX)}
    return {"format": "integer codes in params.safetensors, dequantized in the graph "
                      "(snapc.targets.tvm_quant)",
            "realised": dict(Counter(q["scheme"] for q in quantized.values())),
            "not_realised": sorted(k for k, r in weights.items() if k not in quantized
                                   and r["scheme"] not in ("fp16", "fp32")),  # = build dtype
            "notes": ["w8a8 activation scales are not realised (TVM computes in the build's "
                      "precision)", "fp32 islands are not kept: TVM computes the whole graph "
                      "in the build's precision", "w4 codes are stored one per int8 byte"]}
