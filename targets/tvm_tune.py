"""The MetaSchedule search of ``snapc tune``, run in a child process of its own.

``snapc.tune`` writes a spec (JSON) and runs ``python -m snapc.targets.tvm_tune SPEC``: the
child imports the saved program into Relax exactly as ``snapc compile`` does, lowers it up to
where tuned schedules are applied (``lower(..., stop_at_tuning=True)``), extracts the kernels
(``meta_schedule.relax_integration.extract_tasks``), drops those the records folder already
holds for this target (same workload hash: a second model reuses them) and tunes the rest with
``meta_schedule.tune_tasks`` (evolutionary search, xgboost cost model when xgboost is installed,
else random), measuring on this machine (LocalRunner) or on devices behind a TVM RPC tracker
(RPCRunner). Records go into the spec's working copy of the folder; a JSON summary goes to
stdout, stage marks (``snapc-stage: ...``) to stderr so the parent can say where a crash was.

Why a child process: MetaSchedule runs native code in this process (search, cost model) and
in TVM popen workers; in apache-tvm 0.27 the JSON database crashed with SIGSEGV (see
snapc.targets.tvm_tuning), and a crash must end as a one-line error, not kill snapc.

Why a builder function of our own (``build_kernel``): TVM's default one imports
``tvm.s_tir.tensor_intrin`` in every builder worker, which registers every vendor's tensor
intrinsics by parsing TVMScript (over 100 s on a loaded two-core machine, ~97 s of it CUDA's);
MetaSchedule restarts its builder pool for every batch, so each batch hit the 30 s build
timeout and nothing was ever measured. The cpu and GPU schedules snapc tunes use no
tensorization (fp32 / fp16 SIMT), so the import is skipped; everything else is as TVM's.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["STAGE_MARK", "build_kernel", "export_kernel", "main"]

STAGE_MARK = "snapc-stage: "
_START = time.perf_counter()


def _stage(name: str) -> None:
    sys.stderr.write(f"{STAGE_MARK}{name} [{time.perf_counter() - _START:.1f} s]\n")
    sys.stderr.flush()


def build_kernel(mod: Any, target: Any, _params: Any) -> Any:
    """Build one candidate kernel as TVM's default builder does, without importing every
    vendor's tensor intrinsics (see the module docstring)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def export_kernel(rt_mod: Any, compiler: str | None = None) -> str:
    """Export a built kernel for the runner: a .tar the local machine or an x86 RPC server
    links, or with ``compiler`` (a cross C++ driver) a .so an aarch64 device loads directly."""
    import os
    import tempfile

    from tvm.support import cc
    from tvm.support.tar import tar

    folder = tempfile.mkdtemp(prefix="snapc-ms-")
    if compiler is None:
        path = os.path.join(folder, "kernel.tar")
        rt_mod.export_library(path, fcompile=tar)
    else:
        path = os.path.join(folder, "kernel.so")
        rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


# The tensor intrinsics an llvm target's schedule rules can use (VNNI / AVX-512 on x86, dot
# products on aarch64); GPU targets get TVM's full set.
_CPU_INTRINSICS = {"x86_64": ("x86",), "aarch64": ("arm_cpu",)}
_INTRIN_PACKAGE = "tvm.s_tir.tensor_intrin"


@contextmanager
def _cpu_tensor_intrinsics(target: Any) -> Iterator[None]:
    """Register only the tensor intrinsics of ``target``'s CPU while tuning.

    Why: MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin``, whose ``__init__``
    parses every vendor's intrinsics from TVMScript (CUDA alone ~97 s on a loaded two-core
    machine). For llvm targets the package is entered into ``sys.modules`` without running its
    ``__init__`` and only the CPU's own submodule is imported; the entry is removed on exit.
    Other targets import the package as TVM does.
    """
    import importlib
    import importlib.util
    import types

    triple = str(target.attrs.get("mtriple", "")) if target.kind.name == "llvm" else ""
    subs = next((v for k, v in _CPU_INTRINSICS.items() if triple.startswith(k)), None)
    if subs is None or _INTRIN_PACKAGE in sys.modules:
        yield
        return
    found = importlib.util.find_spec(_INTRIN_PACKAGE)
    package = types.ModuleType(_INTRIN_PACKAGE)
    package.__path__ = list(found.submodule_search_locations or [])
    package.__spec__ = found
    sys.modules[_INTRIN_PACKAGE] = package
    try:
        for sub in subs:
            importlib.import_module(f"{_INTRIN_PACKAGE}.{sub}")
        yield
    finally:
        if sys.modules.get(_INTRIN_PACKAGE) is package:
            del sys.modules[_INTRIN_PACKAGE]


def _tuned(database: Any, task: Any) -> bool:
    """Whether ``database`` already holds a measured schedule of ``task``'s kernel."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    return bool(database.get_top_k(database.commit_workload(mod), 1))


def _heaviest(tasks: list[Any], count: int | None) -> list[Any]:
    """Return the ``count`` tasks with the most FLOPs per model call (FLOPs x occurrences),
    heaviest first; all of them when ``count`` is None."""
    if count is None:
        return tasks
    from tvm.s_tir.analysis import estimate_tir_flops

    def cost(task: Any) -> float:
        return float(estimate_tir_flops(task.dispatched[0])) * int(task.weight)

    return sorted(tasks, key=cost, reverse=True)[:count]


def _runner(spec: dict[str, Any]) -> Any:
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=spec["number"], repeat=spec["repeat"],
                                          min_repeat_ms=spec["min_repeat_ms"],
                                          enable_cpu_cache_flush=False)
    rpc = spec.get("rpc")
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=spec["run_timeout_s"],
                                     evaluator_config=evaluator)
    config = ms.runner.RPCConfig(tracker_host=rpc["host"], tracker_port=rpc["port"],
                                 tracker_key=rpc["key"], session_priority=1,
                                 session_timeout_sec=spec["run_timeout_s"])
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                               max_workers=rpc["workers"])


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _best_us(database: Any, task: Any) -> float | None:
    records = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
    if not records or not records[0].run_secs:
        return None
    secs = [float(s) for s in records[0].run_secs]
    return 1e6 * sum(secs) / len(secs)


def tune(spec: dict[str, Any]) -> dict[str, Any]:
    """Tune the spec's program into ``spec["records"]`` and return the summary."""
    import torch
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from snapc.targets.tvm_build import import_graph, lower, to_fp16
    from snapc.targets.tvm_tuning import open_database

    _stage("importing the program into TVM Relax")
    imported = import_graph(torch.export.load(spec["program"]))
    if spec["precision"] == "fp16":
        imported = to_fp16(imported)
    target = tvm.target.Target(json.loads(spec["target"]))
    _stage("lowering to the tuning point")
    module = lower(imported.module, target, stop_at_tuning=True).module
    _stage("extracting tasks")
    tasks = ms.relax_integration.extract_tasks(module, target)
    database = open_database(Path(spec["records"]))
    reused = {t.task_name for t in tasks if _tuned(database, t)}
    fresh = _heaviest([t for t in tasks if t.task_name not in reused], spec.get("max_kernels"))
    cost_model = _cost_model()
    start = time.perf_counter()
    if fresh and spec["trials"] > 0:
        _stage(f"tuning {len(fresh)} of {len(tasks)} tasks ({spec['trials']} trials)")
        compiler = spec.get("cross_compiler")
        builder = ms.builder.LocalBuilder(
            max_workers=spec["build_workers"], timeout_sec=spec["build_timeout_s"],
            f_build=build_kernel, f_export=partial(export_kernel, compiler=compiler))
        with _cpu_tensor_intrinsics(target):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                fresh, work_dir=spec["work"], num_threads=spec["threads"], seed=spec["seed"])
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=spec["work"],
                max_trials_global=spec["trials"], max_trials_per_task=spec["trials_per_task"],
                num_trials_per_iter=spec["trials_per_iter"], builder=builder,
                runner=_runner(spec), database=database, cost_model=cost_model)
    _stage("summarising")
    return {
        "tasks": [{"name": t.task_name, "weight": int(t.weight),
                   "workload_hash": _hash(t.dispatched[0]),
                   "reused": t.task_name in reused, "best_us": _best_us(database, t)}
                  for t in tasks],
        "cost_model": cost_model, "search_s": time.perf_counter() - start}


def _hash(mod: Any) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def main(argv: list[str]) -> None:
    """Run the spec at ``argv[0]`` and print its summary as one JSON line."""
    spec = json.loads(Path(argv[0]).read_text())
    sys.stdout.write(json.dumps(tune(spec)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
