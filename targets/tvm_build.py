"""Import a Graph into TVM Relax, lower it for a TVM target and compile it.

Phases (``relax_passes``): library dispatch, legalization, default GPU schedules (dlight,
``tvm.s_tir.dlight``), dataflow lowering, finalization: TVM's own per-target pipeline
(``tvm.relax.pipeline.*_passes(target)``), run here in steps so that the TIR functions are
kept both before and after scheduling (the OpenCL kernel check runs scheduled kernels against
unscheduled x86 builds of the same function).

Requires: a graph whose program takes (sample, timestep, encoder_hidden_states) and returns one
tensor; apache-tvm 0.27 (``tvm.compile``, ``tvm.s_tir.dlight``, ``from_exported_program``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    import tvm

__all__ = ["Imported", "Lowered", "import_graph", "to_fp16", "relax_passes", "lower",
           "compile_lowered", "target_json", "count_scheduled", "SCHEDULE_PASS"]

SCHEDULE_PASS = "ApplyDefaultSchedule"  # tvm.s_tir.dlight's pass name


@dataclass
class Imported:
    """A Relax module whose ``main`` takes the user inputs, then the weights, in order.

    ``param_sources`` maps each weight name to its state-dict key in the graph's program;
    ``transposed`` names the weights stored transposed (2-D, see
    snapc.targets.tvm_weight_layout).
    """

    module: tvm.ir.IRModule
    input_names: list[str]
    param_names: list[str]
    params: list[np.ndarray]
    param_sources: dict[str, str] = field(default_factory=dict)
    import_s: float = 0.0
    transposed: list[str] = field(default_factory=list)

    def param_dtypes(self) -> list[str]:
        """Return the dtype ``main`` expects for each weight (fp16 after ``to_fp16``)."""
        params = self.module["main"].params[len(self.input_names):]
        return [str(p.ty.dtype) for p in params]

    def params_as_declared(self) -> dict[str, np.ndarray]:
        """Return {weight name: array} cast to the dtypes ``main`` declares, in order."""
        return {name: value.astype(dtype, copy=False) for name, value, dtype
                in zip(self.param_names, self.params, self.param_dtypes(), strict=True)}


@dataclass
class Lowered:
    """A lowered module ready for ``tvm.compile(..., relax_pipeline=None)``.

    ``unscheduled`` holds the fused TIR functions before the default schedules (dlight's on GPU
    targets, snapc's on CPU targets; None where none ran); ``tuned_kernels`` counts the
    kernels a tuning database scheduled (the default schedules leave those alone); ``passes``
    names the Relax passes that ran, in order.
    """

    module: tvm.ir.IRModule
    target: tvm.target.Target
    unscheduled: tvm.ir.IRModule | None
    passes: list[str] = field(default_factory=list)
    lower_s: float = 0.0
    tuned_kernels: int = 0


def import_graph(program: torch.export.ExportedProgram) -> Imported:
    """Return ``program`` (a Graph's) imported with ``from_exported_program`` in fp32, weights
    kept as inputs of ``main`` and detached as numpy arrays (they are saved separately), those
    only ever transposed stored transposed."""
    import tvm  # noqa: F401
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from snapc.targets.tvm_decompose import decompose_for_tvm
    from snapc.targets.tvm_weight_layout import pretranspose_weights

    start = time.perf_counter()
    module = from_exported_program(decompose_for_tvm(program), keep_params_as_input=True,
                                   unwrap_unit_return_tuple=True, run_ep_decomposition=False)
    module, params = relax.frontend.detach_params(module)
    main = module["main"]
    n_inputs = int(main.attrs["num_input"])
    names = [p.name for p in main.params]
    arrays = [p.numpy() for p in params.get("main", [])]
    sources = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs
               if spec.target is not None}
    imported = Imported(module, names[:n_inputs], names[n_inputs:], arrays,
                        {n: sources.get(n, "") for n in names[n_inputs:]})
    return replace(pretranspose_weights(imported), import_s=time.perf_counter() - start)


def to_fp16(imported: Imported) -> Imported:
    """Return ``imported`` with fp16 compute (``relax.transform.ToMixedPrecision``) and fp16
    weights; conv/matmul accumulate in fp32, the model's inputs and output stay fp32.

    The importer cannot take a ``.half()`` model, so fp32 is imported and converted here.
    """
    from tvm import relax

    floats = [n for n, v in zip(imported.param_names, imported.params, strict=True)
              if np.issubdtype(v.dtype, np.floating)]  # quantized codes stay integers
    convert = relax.transform.ToMixedPrecision(out_dtype="float32", fp16_input_names=floats)
    return replace(imported, module=convert(imported.module))


def _backend_pipeline(target: tvm.target.Target) -> ModuleType:
    """Return the module holding TVM's phase functions for ``target``, chosen the way
    ``tvm.relax.pipeline.get_default_pipeline`` chooses. (0.27's ``relax.pipeline.*_passes``
    dispatchers reach for names that the cuda and cpu backend packages do not export, so the
    backends' own ``pipeline`` modules are used.)"""
    from tvm.relax.backend.adreno import pipeline as adreno
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.relax.backend.gpu_generic import pipeline as gpu

    if target.kind.name == "cuda":
        return cuda
    if target.kind.name == "llvm":
        return cpu
    if target.kind.name == "opencl" and "adreno" in target.keys:
        return adreno
    if "gpu" in target.keys:
        return gpu
    raise ValueError(f"no TVM Relax pipeline for target {target}")


def relax_passes(target: tvm.target.Target, cpu_schedules: bool = True,
                 fast_math: bool = True) -> list[tvm.transform.Pass]:
    """Return TVM's default Relax pipeline for ``target`` as a flat pass list (dlight default
    schedules included for GPU targets). On CPU targets, whose TVM pipeline schedules nothing,
    ``cpu_schedules`` adds snapc's default CPU schedules (snapc.targets.tvm_cpu_schedule)
    right after legalization, where the GPU pipelines apply dlight's, and ``fast_math`` first
    puts exp / erf / sigmoid / softmax / gelu on vectorizable approximations
    (snapc.targets.tvm_fast_math)."""
    phases = _backend_pipeline(target)
    schedule, fast = [], []
    if target.kind.name == "llvm":
        from tvm.s_tir import dlight

        from snapc.targets.tvm_cpu_schedule import cpu_rules
        from snapc.targets.tvm_fast_math import fast_math_passes

        schedule = [dlight.ApplyDefaultSchedule(*cpu_rules())] if cpu_schedules else []
        fast = fast_math_passes() if fast_math else []
    return (fast + phases.library_dispatch_passes(target) + phases.legalize_passes(target)
            + schedule + phases.dataflow_lower_passes(target) + phases.finalize_passes(target))


def _tir_only(module: tvm.ir.IRModule) -> tvm.ir.IRModule:
    import tvm

    return tvm.IRModule({gv: f for gv, f in module.functions_items()
                         if isinstance(f, tvm.tirx.PrimFunc)})


def _without_tensor_cores(module: tvm.ir.IRModule) -> tvm.ir.IRModule:
    """Return ``module`` with every TIR function marked ``dlight.do_not_tensorize``."""
    import tvm

    out = module.clone()
    for gv, func in module.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            out.update_func(gv, func.with_attr("dlight.do_not_tensorize", True))
    return out


def lower(
    module: tvm.ir.IRModule,
    target: tvm.target.Target,
    instruments: list[Any] | None = None,
    tensor_cores: bool = True,
    database: Any | None = None,
    stop_at_tuning: bool = False,
    cpu_schedules: bool = True,
    fast_math: bool = True,
) -> Lowered:
    """Return ``module`` lowered by ``relax_passes(target)``; the fused TIR functions are
    snapshotted just before the first dlight schedule pass. ``instruments`` are TVM pass
    instruments (the texture probe uses one to name the pass that crashes). ``tensor_cores``
    False keeps dlight's Matmul rule off the tensor-core (MMA) path on CUDA. ``database``, a
    MetaSchedule database, applies its tuned schedules (``MetaScheduleApplyDatabase``) where
    ``snapc.targets.tvm_tuning.APPLY_BEFORE`` says; ``stop_at_tuning`` returns the module at
    that point instead (the module ``snapc tune`` extracts its tasks from). ``cpu_schedules``
    False leaves CPU kernels as TVM's pipeline leaves them (naive loop nests; for comparison);
    ``fast_math`` False keeps the CPU builds' libm exp / erf (snapc.targets.tvm_fast_math).

    The snapshot is a new IRModule: dlight's ApplyDefaultSchedule updates the module it is
    given in place, but PrimFuncs themselves are immutable, so a new module keeps the
    unscheduled ones. (``tvm.ir.save_json`` would deep-copy, but it segfaults in 0.27.)"""
    import tvm

    start = time.perf_counter()
    unscheduled = None
    names: list[str] = []
    from tvm import relax

    from snapc.targets.tvm_tuning import APPLY_BEFORE

    tuned = False
    tuned_kernels = 0
    with tvm.transform.PassContext(opt_level=3, instruments=instruments or []), target:
        for step in relax_passes(target, cpu_schedules, fast_math):
            if step.info.name in APPLY_BEFORE and not tuned:
                tuned = True
                if stop_at_tuning:
                    break
                if database is not None:
                    with database:
                        module = relax.transform.MetaScheduleApplyDatabase()(module)
                    names.append("MetaScheduleApplyDatabase")
                    tuned_kernels = count_scheduled(module)
            if step.info.name == SCHEDULE_PASS and unscheduled is None:
                unscheduled = _tir_only(module)
                if not tensor_cores:
                    module = _without_tensor_cores(module)
            module = step(module)
            names.append(step.info.name)
    return Lowered(module, target, unscheduled, names, time.perf_counter() - start,
                   tuned_kernels)


def count_scheduled(module: tvm.ir.IRModule) -> int:
    """Return how many TIR kernels of ``module`` carry a schedule (``tirx.is_scheduled``)."""
    import tvm

    return sum(1 for _, f in module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and f.attrs is not None and "tirx.is_scheduled" in f.attrs)


def compile_lowered(lowered: Lowered) -> tvm.runtime.Executable:
    """Return the VM executable of an already lowered module (TIR pipeline and codegen)."""
    import tvm

    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(lowered.module, target=lowered.target, relax_pipeline=None)


def target_json(target: tvm.target.Target) -> dict[str, Any]:
    """Return ``target`` (with its host) as a JSON-ready dict."""
    return json.loads(str(target))
