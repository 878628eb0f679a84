"""snapc's TVM x86 builds (untuned and MetaSchedule-tuned) vs onnxruntime on snapc's ONNX, one run.

On this CPU, for MODEL (default ``shapes``) at batch 2, in one process:

  ort              snapc compile --target onnx, run by onnxruntime's CPU provider
  tvm_naive        --mcpu native without snapc's default CPU schedules: the loop nests TVM's
                   CPU pipeline leaves (what snapc shipped before them)
  tvm_generic      snapc compile --target x86 as shipped (LLVM generic x86-64, snapc's default
                   CPU schedules: snapc.targets.tvm_cpu_schedule)
  tvm_native_libm  the same with --mcpu native (LLVM CPU of this machine: AVX2 / AVX-512)
                   and the scalar libm exp / erf (TvmOptions.fast_math off)
  tvm_native_before  --mcpu native with snapc's earlier CPU schedules: dlight's Reduction
                   rule for softmax and norms (one serial add chain per output) and register
                   tiles of at most 4 rows (not WIDE_ROW_TILES)
  tvm_native_import_before  --mcpu native, the import as before snapc.targets.tvm_decompose
                   and snapc.targets.tvm_weight_layout: attention through PyTorch's
                   safe-softmax decomposition, every Linear weight transposed on each call
  tvm_native       --mcpu native as shipped: exp / erf / sigmoid / softmax / gelu on
                   vectorizable approximations (snapc.targets.tvm_fast_math), row reductions
                   on vector partial sums (snapc.targets.tvm_cpu_schedule.VectorReduction),
                   up to 8-row register tiles with 512-bit vectors
  tvm_tuned        --mcpu native --tuning RECORDS, the records from ``snapc tune`` (--trials);
                   kernels without a record keep the default schedules

Every artifact is verified against PyTorch by its target as usual (a failed check stops the
run). Calls of the variants are interleaved round by round with the same inputs; the median
and best per variant and the ratios to onnxruntime are printed, written to
``bench/out/tvm_x86.json`` and to the ``## TVM x86`` section of bench/RESULTS.md with the
machine. Tuning time is reported. Keep --trials modest on a shared machine.

    nice python bench/tvm_x86.py --trials 64 --rounds 10 --write-results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench.results, when run as a script


def _ort_runner(folder: Path, threads: int) -> tuple[Any, dict[str, np.ndarray]]:
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Interleaved with TVM: onnxruntime's threads must not spin on the cores TVM then needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(folder / manifest["files"]["model"]), options,
                                   providers=["CPUExecutionProvider"])
    return session, manifest


def _tvm_call(folder: Path, inputs: list[np.ndarray]) -> Any:
    import tvm
    from safetensors.numpy import load_file
    from tvm import relax

    manifest = json.loads((folder / "manifest.json").read_text())
    info = manifest["extra"]["tvm"]
    device = tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), device)
    weights = load_file(str(folder / "params.safetensors"))
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    args += [tvm.runtime.tensor(weights[n], device) for n in info["param_order"]]
    return lambda: vm["main"](*args).numpy()


@contextlib.contextmanager
def _schedules(earlier: bool) -> Iterator[None]:
    """Build with snapc's CPU schedules, or with the earlier ones (no VectorReduction, so
    dlight's Reduction rule takes softmax and norms; 4-row tiles); the bench's comparison."""
    if not earlier:
        yield
        return
    from snapc.targets import tvm_cpu_schedule

    shipped = tvm_cpu_schedule.cpu_rules

    def previous() -> list:
        return [r for r in shipped() if not isinstance(r, tvm_cpu_schedule.VectorReduction)]

    with mock.patch.object(tvm_cpu_schedule, "cpu_rules", previous), \
            mock.patch.object(tvm_cpu_schedule, "WIDE_ROW_TILES", tvm_cpu_schedule.ROW_TILES):
        yield


@contextlib.contextmanager
def _import(earlier: bool) -> Iterator[None]:
    """Import as snapc does, or as before the fourteenth session: PyTorch's own attention
    decomposition (safe-softmax guards) and every Linear weight transposed on each call."""
    if not earlier:
        yield
        return
    from dataclasses import replace

    from snapc.targets import tvm_decompose, tvm_weight_layout

    with mock.patch.object(tvm_decompose, "decompose_for_tvm",
                           lambda program: program.run_decompositions()), \
            mock.patch.object(tvm_weight_layout, "pretranspose_weights",
                              lambda imported: replace(imported, transposed=[])):
        yield


def main() -> None:
    """Build, tune, verify and time the variants; print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--per-round", type=int, default=8,
                        help="trials per search round (MetaSchedule tunes one kernel a round)")
    parser.add_argument("--max-kernels", type=int, default=8,
                        help="tune the N heaviest kernels (FLOPs x uses)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=Path, default=None,
                        help="records folder to tune into (default: a temporary one)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    # TVM's pool defaults to the physical cores (1 on a 2-vCPU machine); give it as many
    # threads as onnxruntime, before its runtime starts.
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    from bench.results import machine, write_section
    from snapc.compiler import CompileOptions, compile_model, load_graph
    from snapc.targets.tvm import TvmOptions, export
    from snapc.tune import TuneOptions, tune_graph

    host = machine()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="snapc-tvm-x86-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        graph = load_graph(args.model, batch=args.batch)
        inputs = [t.detach().numpy() for t in graph.example_inputs]
        reference = graph.example_output.detach().numpy()
        compile_model(CompileOptions(model=args.model, target="onnx", out=root / "onnx",
                                     batch=args.batch))
        timings["onnx_compile_s"] = time.perf_counter() - start
        records = args.records or root / "records"
        start = time.perf_counter()
        tuned = tune_graph(graph, TuneOptions(model=args.model, target="x86", out=records,
                                              trials=args.trials, mcpu="native",
                                              trials_per_iter=args.per_round,
                                              max_kernels=args.max_kernels, batch=args.batch),
                          progress=print)
        timings["tune_s"] = time.perf_counter() - start
        builds = {"tvm_naive": TvmOptions(target="x86", mcpu="native", cpu_schedules=False),
                  "tvm_generic": TvmOptions(target="x86"),
                  "tvm_native_libm": TvmOptions(target="x86", mcpu="native", fast_math=False),
                  "tvm_native_before": TvmOptions(target="x86", mcpu="native"),
                  "tvm_native_import_before": TvmOptions(target="x86", mcpu="native"),
                  "tvm_native": TvmOptions(target="x86", mcpu="native"),
                  "tvm_tuned": TvmOptions(target="x86", mcpu="native", tuning=str(records))}
        manifests = {}
        for name, options in builds.items():
            folder = root / name
            folder.mkdir()
            start = time.perf_counter()
            with _schedules(earlier=name == "tvm_native_before"), \
                    _import(earlier=name == "tvm_native_import_before"):
                manifest = export(graph, folder, options, progress=print)
            manifest.write(folder)
            manifests[name] = manifest
            timings[f"{name}_build_s"] = time.perf_counter() - start
        session, onnx_manifest = _ort_runner(root / "onnx", args.threads)
        names = [i["name"] for i in onnx_manifest["inputs"]]
        calls = {"ort": lambda: session.run(None, dict(zip(names, inputs, strict=True)))[0]}
        calls.update({name: _tvm_call(root / name, inputs) for name in builds})
        errors = {n: float(np.abs(call() - reference).max()) for n, call in calls.items()}
        samples: dict[str, list[float]] = {n: [] for n in calls}
        for round_ in range(args.rounds):
            order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
            for name in order:
                begin = time.perf_counter()
                calls[name]()
                samples[name].append((time.perf_counter() - begin) * 1000.0)
    rows = {n: {"median_ms": statistics.median(s), "best_ms": min(s), "samples_ms": s,
                "max_abs_vs_torch": errors[n]} for n, s in samples.items()}
    for row in rows.values():
        row["vs_ort"] = row["median_ms"] / rows["ort"]["median_ms"]
    tasks = tuned.summary["tasks"]
    record = {
        "model": args.model, "batch": args.batch, "machine": host, "threads": args.threads,
        "rounds": args.rounds, "trials": args.trials, "per_round": args.per_round,
        "max_kernels": args.max_kernels, "rows": rows,
        "tuning": {"tasks": len(tasks), "tuned": sum(t["best_us"] is not None for t in tasks),
                   "cost_model": tuned.summary["cost_model"], "seconds": timings["tune_s"],
                   "applied": manifests["tvm_tuned"].extra["tvm"]["tuning"]["applied_kernels"]},
        "verification_psnr_db": {n: m.verification["psnr_db"] for n, m in manifests.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    out = HERE / "out" / "tvm_x86.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    table = ["| variant | median ms | best ms | x onnxruntime | max abs vs torch |",
             "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        table.append(f"| {name} | {row['median_ms']:.1f} | {row['best_ms']:.1f} | "
                     f"{row['vs_ort']:.2f}x | {row['max_abs_vs_torch']:.1e} |")
    tuning = record["tuning"]
    body = "\n".join([
        f"`python bench/tvm_x86.py --trials {args.trials} --per-round {args.per_round} "
        f"--max-kernels {args.max_kernels} --rounds {args.rounds}` on {host}.",
        f"{args.model} UNet at batch {args.batch}, {args.threads} threads each (onnxruntime "
        "intra-op, no spinning; TVM_NUM_THREADS), interleaved rounds, one process.", "",
        *table, "",
        f"Tuning: {tuning['tasks']} kernels, {tuning['tuned']} measured in {args.trials} "
        f"trials ({tuning['cost_model']} cost model), {tuning['seconds']:.0f} s; applied to "
        f"{tuning['applied']['tuned']} of {tuning['applied']['kernels']} kernels of the tuned "
        "build (the rest keep the default schedules). Figures: bench/out/tvm_x86.json."])
    print(body)
    if args.write_results:
        write_section("TVM x86", body)


if __name__ == "__main__":
    main()
