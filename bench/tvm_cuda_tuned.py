"""SD-1.5 fp16 UNet per call on one GPU: PyTorch eager, torch.compile, snapc TVM cuda untuned,
MetaSchedule-tuned, and library-offloaded (cuBLAS), same run, with the tuning time.

Unlike bench/tvm_cuda.py (which builds here and only runs a runtime bundle on the GPU machine),
this script tunes, so it needs TVM's compiler on the GPU machine: ``pip install 'snapc[tvm]'``
there (apache-tvm 0.27 with apache-tvm-ffi 0.1.14.post1), plus nvcc. It has not been run yet:
no machine that has both a GPU and TVM was available when it was written.

  eager       the diffusers UNet in fp16 on cuda
  compile     ``torch.compile(unet)`` (default mode), after warm-up
  tvm         snapc TVM ``cuda`` target, fp16, dlight default schedules
  tvm_tuned   the same with ``--tuning``: ``snapc tune`` records (``--trials``, heaviest
              ``--max-kernels``), measured on this GPU
  tvm_cublas  the same with ``--offload cublas``; where the TVM build lacks cuBLAS
              (the pip wheel) the row carries the one-line reason instead of a time

Each TVM artifact is verified by the target against PyTorch as always (a failure stops the
run). Calls are interleaved round by round; medians and ratios to eager are printed and written
to ``bench/out/tvm_cuda_tuned.json`` (``--write-results``: the ``## TVM CUDA tuned`` section).

GPU calls are short (10 minutes), so the work splits: ``--phase tune`` tunes into a kept
``--records`` folder in rounds of ``--max-kernels`` kernels until ``--tune-minutes`` are spent
(each round lands atomically; the next call tunes the kernels still missing), and ``--phase
measure`` builds and times with the records as they are, adding their total tuning time::

    python bench/tvm_cuda_tuned.py --phase tune --records R --tune-minutes 8
    python bench/tvm_cuda_tuned.py --phase measure --records R --write-results
    python bench/tvm_cuda_tuned.py --quick      # tiny UNet, 32 trials, both phases: checks the path

TVM's compiler is not on the GPU machine: ``python scripts/device_tvm.py`` packs it to carry.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET = "cuda"  # the tuning loop is target-agnostic: x86 exercises it on a CPU
sys.path.insert(0, str(HERE.parent))  # bench.results, when run as a script


def _tvm_call(folder: Path, inputs: list[Any]) -> Callable[[], Any]:
    import tvm
    from safetensors.numpy import load_file
    from tvm import relax

    from snapc.targets.tvm_cuda import use_precompiled_kernels

    info = json.loads((folder / "manifest.json").read_text())["extra"]["tvm"]
    use_precompiled_kernels(folder)
    device = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), device)
    weights = load_file(str(folder / "params.safetensors"))
    args = [tvm.runtime.tensor(t.detach().cpu().numpy(), device) for t in inputs]
    args += [tvm.runtime.tensor(weights[n], device) for n in info["param_order"]]

    def call() -> Any:
        out = vm["main"](*args)
        device.sync()
        return out

    return call


def _torch_call(module: Any, inputs: list[Any]) -> Callable[[], Any]:
    import torch

    def call() -> Any:
        with torch.inference_mode():
            out = module(*inputs)
        torch.cuda.synchronize()
        return out

    return call


def _tune(graph: Any, args: argparse.Namespace, arch: str, records: Path) -> dict[str, Any]:
    """Tune into ``records`` round by round until the minutes are spent or no kernel is left;
    return what the rounds did."""
    from snapc.tune import TuneOptions, tune_graph

    start, rounds = time.perf_counter(), []
    while True:
        begin = time.perf_counter()
        done = tune_graph(graph, TuneOptions(
            model=args.model, target=TARGET, out=records, trials=args.trials,
            trials_per_task=args.trials_per_kernel, precision="fp16",
            max_kernels=args.max_kernels, cuda_arch=arch, build_workers=args.build_workers),
            progress=print)
        tasks = done.summary["tasks"]
        tuned = [t for t in tasks if not t["reused"] and t["best_us"] is not None]
        left = [t for t in tasks if not t["reused"] and t["best_us"] is None]
        rounds.append({"kernels": len(tuned), "left": len(left), "tasks": len(tasks),
                       "seconds": round(time.perf_counter() - begin, 1)})
        print(f"round {len(rounds)}: {len(tuned)} kernels tuned in {rounds[-1]['seconds']} s, "
              f"{len(left)} of {len(tasks)} left; records in {records}", flush=True)
        spent = time.perf_counter() - start
        if not left or not tuned or spent + rounds[-1]["seconds"] > args.tune_minutes * 60:
            return {"rounds": rounds, "seconds": round(spent, 1),
                    "cost_model": done.summary["cost_model"]}


def _measure(graph: Any, args: argparse.Namespace, arch: str, records: Path | None,
             build_root: Path) -> tuple[dict[str, list[float]], dict[str, float], dict[str, str]]:
    """Build each variant, verify it, and time it beside eager and torch.compile."""
    import torch

    from snapc.errors import SnapcError
    from snapc.models import load_model
    from snapc.targets.tvm import TvmOptions, export

    loaded = load_model(args.model)
    unet = loaded.module.to("cuda", torch.float16).eval()
    inputs = [t.to("cuda", torch.float16) for t in loaded.example_inputs]
    calls: dict[str, Callable[[], Any]] = {"eager": _torch_call(unet, inputs)}
    compiled = torch.compile(unet)
    start = time.perf_counter()
    _torch_call(compiled, inputs)()
    timings = {"torch_compile_s": time.perf_counter() - start}
    calls["compile"] = _torch_call(compiled, inputs)
    builds: dict[str, dict[str, Any]] = {"tvm": {}, "tvm_cublas": {"offload": "cublas"}}
    if records is not None:
        builds["tvm_tuned"] = {"tuning": str(records)}
    skipped: dict[str, str] = {}
    for name, extra in builds.items():
        folder = build_root / name
        folder.mkdir()
        start = time.perf_counter()
        try:
            manifest = export(graph, folder, TvmOptions(target="cuda", precision="fp16",
                                                        cuda_arch=arch, **extra), print)
        except SnapcError as exc:
            if "offload" not in extra:
                raise
            skipped[name] = str(exc)
            continue
        manifest.write(folder)
        timings[f"{name}_build_s"] = time.perf_counter() - start
        calls[name] = _tvm_call(folder, graph.example_inputs)
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {n: [] for n in calls}
    for round_ in range(args.rounds):
        for name in (list(calls) if round_ % 2 == 0 else list(reversed(calls))):
            begin = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - begin) * 1000.0)
    return samples, timings, skipped


def main() -> None:
    """Tune, or build, verify and time the variants on cuda:0; print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--quick", action="store_true",
                        help="tiny UNet, 32 trials, 3 rounds, both phases")
    parser.add_argument("--phase", choices=["tune", "measure", "both"], default="both")
    parser.add_argument("--records", type=Path, default=None,
                        help="tuning records kept between calls (default: a scratch folder)")
    parser.add_argument("--tune-minutes", type=float, default=8.0)
    parser.add_argument("--trials", type=int, default=1024, help="trials per tuning round")
    parser.add_argument("--trials-per-kernel", type=int, default=None)
    parser.add_argument("--max-kernels", type=int, default=16,
                        help="kernels per tuning round (each round re-lowers the model first)")
    parser.add_argument("--build-workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cuda-arch", default=None, help="default: this GPU's sm_XY")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.model, args.trials, args.max_kernels, args.rounds = "tiny", 32, 4, 3
        args.tune_minutes = 0.1

    import torch

    from bench.results import write_section
    from snapc.compiler import load_graph

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run this on a GPU machine")
    major, minor = torch.cuda.get_device_capability()
    arch = args.cuda_arch or f"sm_{major}{minor}"
    gpu = torch.cuda.get_device_name()
    graph = load_graph(args.model)  # fp32 trace on the CPU: the TVM import converts to fp16
    with tempfile.TemporaryDirectory(prefix="snapc-tvm-cuda-") as tmp:
        root = Path(tmp)
        records = args.records or root / "rec"
        tuning = None
        if args.phase in ("tune", "both"):
            tuning = _tune(graph, args, arch, records)
            print(json.dumps({"tuning": tuning}), flush=True)
            if args.phase == "tune":
                return
        if not records.is_dir():
            raise SystemExit(f"error: no tuning records at {records}: run --phase tune first")
        samples, timings, skipped = _measure(graph, args, arch, records, root)
        kept = _records_summary(records)
        timings["tune_s"] = kept["search_s"]
    eager = statistics.median(samples["eager"])
    rows = {n: {"median_ms": statistics.median(s), "best_ms": min(s),
                "vs_eager": statistics.median(s) / eager} for n, s in samples.items()}
    record = {"model": args.model, "gpu": gpu, "cuda_arch": arch, "rounds": args.rounds,
              "rows": rows, "not_built": skipped, "tuning": tuning,
              "records": kept,
              "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    out = HERE / "out" / ("tvm_cuda_tuned_quick.json" if args.quick else "tvm_cuda_tuned.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| variant | median ms | best ms | x eager |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | {r['vs_eager']:.2f}x |"
              for n, r in rows.items()]
    lines += [f"| {n} | not built: {why} | | |" for n, why in skipped.items()]
    body = "\n".join([f"{args.model} UNet fp16 on {gpu} ({arch}); the records hold "
                      f"{record['records']['kernels']} tuned kernels from "
                      f"{timings['tune_s']:.0f} s of search.", "", *lines])
    print(body)
    if args.write_results and not args.quick:
        write_section("TVM CUDA tuned", body)


def _records_summary(records: Path) -> dict[str, Any]:
    """What ``records``' index holds: tuned kernels, workloads, records, the tuning runs and
    the search seconds of all of them."""
    from snapc.targets.tvm_tuning import read_index

    index = read_index(records)
    runs = index.get("models", [])
    return {"kernels": len(index.get("kernels", {})), "workloads": index.get("workloads"),
            "records": index.get("records"), "runs": len(runs),
            "search_s": sum(m.get("search_s", 0.0) for m in runs)}


if __name__ == "__main__":
    main()
