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

    python bench/tvm_cuda_tuned.py --trials 2000 --max-kernels 40 --write-results
    python bench/tvm_cuda_tuned.py --quick      # tiny UNet, 32 trials: checks the path
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


def main() -> None:
    """Tune, build, verify and time the variants on cuda:0; print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--quick", action="store_true", help="tiny UNet, 32 trials, 3 rounds")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--max-kernels", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cuda-arch", default=None, help="default: this GPU's sm_XY")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.model, args.trials, args.max_kernels, args.rounds = "tiny", 32, 4, 3

    import torch

    from bench.results import write_section
    from snapc.compiler import load_graph
    from snapc.errors import SnapcError
    from snapc.models import load_model
    from snapc.targets.tvm import TvmOptions, export
    from snapc.tune import TuneOptions, tune_graph

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run this on a GPU machine")
    major, minor = torch.cuda.get_device_capability()
    arch = args.cuda_arch or f"sm_{major}{minor}"
    gpu = torch.cuda.get_device_name()
    loaded = load_model(args.model)
    unet = loaded.module.to("cuda", torch.float16).eval()
    inputs = [t.to("cuda", torch.float16) for t in loaded.example_inputs]
    calls: dict[str, Callable[[], Any]] = {"eager": _torch_call(unet, inputs)}
    compiled = torch.compile(unet)
    start = time.perf_counter()
    _torch_call(compiled, inputs)()
    timings = {"torch_compile_s": time.perf_counter() - start}
    calls["compile"] = _torch_call(compiled, inputs)
    graph = load_graph(args.model)  # fp32 trace on the CPU: the TVM import converts to fp16
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="snapc-tvm-cuda-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        tuned = tune_graph(graph, TuneOptions(model=args.model, target="cuda", out=root / "rec",
                                              trials=args.trials, precision="fp16",
                                              max_kernels=args.max_kernels, cuda_arch=arch),
                           progress=print)
        timings["tune_s"] = time.perf_counter() - start
        builds = {"tvm": {}, "tvm_tuned": {"tuning": str(root / "rec")},
                  "tvm_cublas": {"offload": "cublas"}}
        for name, extra in builds.items():
            folder = root / name
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
    eager = statistics.median(samples["eager"])
    rows = {n: {"median_ms": statistics.median(s), "best_ms": min(s),
                "vs_eager": statistics.median(s) / eager} for n, s in samples.items()}
    record = {"model": args.model, "gpu": gpu, "cuda_arch": arch, "rounds": args.rounds,
              "trials": args.trials, "max_kernels": args.max_kernels, "rows": rows,
              "not_built": skipped, "tuning_cost_model": tuned.summary["cost_model"],
              "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    out = HERE / "out" / ("tvm_cuda_tuned_quick.json" if args.quick else "tvm_cuda_tuned.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| variant | median ms | best ms | x eager |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | {r['vs_eager']:.2f}x |"
              for n, r in rows.items()]
    lines += [f"| {n} | not built: {why} | | |" for n, why in skipped.items()]
    body = "\n".join([f"{args.model} UNet fp16 on {gpu} ({arch}); tuning {args.trials} trials "
                      f"over the {args.max_kernels} heaviest kernels took "
                      f"{timings['tune_s']:.0f} s.", "", *lines])
    print(body)
    if args.write_results and not args.quick:
        write_section("TVM CUDA tuned", body)


if __name__ == "__main__":
    main()
