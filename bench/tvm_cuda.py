"""SD-1.5 UNet through TVM CUDA (untuned dlight schedules) vs PyTorch eager fp16, on one GPU.

The GPU machine has no TVM and nothing can be installed there from a registry, and the TVM
wheel (100 MB) is over the 64 MiB that one call can carry. So the work is split:

1. ``prepare`` (here, where TVM and nvcc are): compile with snapc's TVM ``cuda`` target (sm_90)
   the ``tiny`` UNet at the target's default fp32 (the correctness check) and the ``sd15`` UNet
   at fp16 twice, SIMT and tensor-core matmuls (the timing), then pack what the GPU side
   needs: each ``model.so`` (host code and kernel source), ``cuda_kernels.cubin`` (the
   kernels, compiled here by nvcc) and ``manifest.json``, TVM's runtime-only Python package
   (no libtvm_compiler.so), the cp312 ``apache-tvm-ffi`` wheel and the diffusers wheel. Weights are
   not carried: the GPU side rebuilds the same random-weight UNets and feeds their state dicts
   to TVM by each manifest's ``param_sources``.

       python bench/tvm_cuda.py prepare --bundle .whl/tvm_cuda

2. ``run`` (on the GPU machine): unpack the bundle into a temp folder; check that ``tiny``
   through TVM CUDA fp32 matches PyTorch fp32 on the GPU (PSNR >= 60 dB, else exit 1); then time
   PyTorch eager fp16 and both TVM fp16 builds on sd15 with the same inputs and weights,
   interleaved in rounds, and compare every output with PyTorch fp32 (a TVM build below the
   target's 30 dB fp16 gate fails the run). Prints a markdown table and one JSON line.

       python3 bench/tvm_cuda.py run --bundle .whl/tvm_cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20
# the pinned apache-tvm-ffi of pyproject's `tvm` extra (0.1.15 segfaults in TVM 0.27's
# ToJSONGraph: MetaSchedule records and every tensor-core Tensorize)
TVM_FFI = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())
               ["project"]["optional-dependencies"]["tvm"] if d.startswith("apache-tvm-ffi"))
DIFFUSERS = "diffusers==0.42.1"


def _runtime_tarball(bundle: Path) -> None:
    """Pack TVM's Python package without the compiler library, sources and headers."""
    import tvm

    package = Path(tvm.__file__).parent
    skip = {"libtvm_compiler.so", "3rdparty", "src", "include", "__pycache__"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if skip & set(Path(info.name).parts) else info

    with tarfile.open(bundle / "tvm_runtime.tar.gz", "w:gz") as tar:
        tar.add(package, arcname="tvm", filter=keep)


# (bundle folder, model, precision, tensor cores): the check, then the timed builds
BUILDS = (("tiny", "tiny", "fp32", False), ("sd15", "sd15", "fp16", False),
          ("sd15_tc", "sd15", "fp16", True))
TIMED = {"sd15": "TVM CUDA, dlight default schedules, fp16 (SIMT matmuls)",
         "sd15_tc": "TVM CUDA, dlight default schedules, fp16, tensor cores (WMMA)"}
FP16_GATE_DB = 30.0  # the TVM target's own gate for fp16 builds against PyTorch fp32


def prepare(bundle: Path, build_root: Path) -> None:
    """Compile ``BUILDS`` for cuda and write the GPU-side bundle into ``bundle``."""
    from snapc.artifacts import atomic_output_dir
    from snapc.frontend import trace
    from snapc.models import load_model
    from snapc.targets.tvm import TvmOptions, export
    from snapc.targets.tvm_cuda import CUBIN

    start = time.perf_counter()
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    for label, model, precision, tensor_cores in BUILDS:
        loaded = load_model(model)
        graph = trace(loaded.module, loaded.example_inputs, loaded.info)
        del loaded
        folder = build_root / f"tvm_cuda_{label}"
        options = TvmOptions(target="cuda", precision=precision, tensor_cores=tensor_cores)
        with atomic_output_dir(folder, force=True) as tmp:
            manifest = export(graph, tmp, options, lambda msg, name=label: print(
                f"[{time.perf_counter() - start:6.0f} s] {name}: {msg}", flush=True))
            manifest.write(tmp)
        kernels = manifest.extra["tvm"]["cuda_kernels"]
        if tensor_cores and not kernels["tensor_core_kernels"]:
            raise SystemExit(f"{label}: no kernel uses tensor cores ({manifest.notes})")
        print(f"{label}: {kernels['kernels']} kernels, {kernels['tensor_core_kernels']} on "
              "tensor cores", flush=True)
        (bundle / label).mkdir()
        for name in ("model.so", "manifest.json", CUBIN):
            shutil.copyfile(folder / name, bundle / label / name)
    _runtime_tarball(bundle)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(bundle), TVM_FFI, DIFFUSERS], check=True)
    total = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(f"bundle {bundle}: {total / 2**20:.1f} MiB "
          f"(build {time.perf_counter() - start:.0f} s)")
    if total > CARRY_LIMIT:
        raise SystemExit(f"bundle is {total / 2**20:.1f} MiB, over the 64 MiB carry limit")


def _unpack(bundle: Path) -> Path:
    """Install the bundle's wheels and TVM runtime into a temp folder; return its path."""
    site = Path(tempfile.mkdtemp(prefix="snapc-tvm-rt-"))
    for wheel in bundle.glob("*.whl"):  # a wheel is a zip of its site-packages files
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    with tarfile.open(bundle / "tvm_runtime.tar.gz") as tar:
        tar.extractall(site, filter="data")
    return site


def _cuda_ms(fn, warmup: int, repeat: int) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return times


def _load_tvm_cuda_runtime(library: Path) -> None:
    """Load TVM's CUDA runtime (the runtime-only package does not); it needs libcudart.so.13,
    from the CUDA toolkit or from PyTorch's nvidia wheels when the loader cannot find it."""
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    roots = [Path(p) for p in sys.path if p] + [Path("/usr/local")]
    for root in roots:
        for cudart in sorted(root.glob("**/libcudart.so.13*")) if root.is_dir() else []:
            ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
            return
    raise SystemExit("libcudart.so.13 not found for TVM's CUDA runtime")


def _unet_and_inputs(folder: Path) -> tuple[Any, tuple, dict]:
    """Return (UNet with seed-0 random weights, inputs, manifest's TVM info)."""
    import torch
    from diffusers import UNet2DConditionModel

    from snapc.models import MODELS, unet_example_inputs

    manifest = json.loads((folder / "manifest.json").read_text())
    info, config = manifest["extra"]["tvm"], manifest["model"]["config"]
    shapes = {s["name"]: s["shape"] for s in manifest["inputs"]}
    if manifest["model"]["name"] not in MODELS:
        raise SystemExit(f"{folder}: model {manifest['model']['name']} is not a registered one")
    torch.manual_seed(0)
    net = UNet2DConditionModel(**config).eval()
    inputs = unet_example_inputs(config, batch=shapes["sample"][0], latent=shapes["sample"][-1],
                                 context_len=shapes["encoder_hidden_states"][1])
    return net, inputs, info


def _tvm_weights(state: dict, info: dict) -> dict:
    """Return a build's TVM weights (by its manifest's TVM info) from the UNet's state dict;
    those the build stores transposed (``param_transposed``) transposed."""
    transposed = set(info.get("param_transposed", ()))
    weights = {}
    for name in info["param_order"]:
        value = state[info["param_sources"][name].removeprefix("net.")]
        value = value.t().contiguous() if name in transposed else value
        weights[name] = value.numpy().astype(info["param_dtypes"][name])
    return weights


def _tvm_module(folder: Path, inputs: tuple, info: dict, weights: dict) -> tuple[Any, list]:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from snapc.targets.tvm_cuda import use_precompiled_kernels

    use_precompiled_kernels(folder)  # the runtime-only TVM cannot compile CUDA source itself
    device = tvm.cuda(0)
    vm = VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), device)
    args = [tvm.runtime.tensor(t.numpy(), device) for t in inputs]
    args += [tvm.runtime.tensor(weights[n], device) for n in info["param_order"]]
    return vm, args


def check_tiny(folder: Path) -> dict:
    """Run the fp32 tiny build on the GPU; return its numerics against PyTorch fp32 there."""
    import numpy as np
    import torch

    from snapc.numerics import compare

    net, inputs, info = _unet_and_inputs(folder)
    weights = _tvm_weights(net.state_dict(), info)
    with torch.no_grad():
        reference = net(*inputs, return_dict=False)[0]  # CPU fp32: no TF32 in the reference
    vm, args = _tvm_module(folder, inputs, info, weights)
    numerics = compare(reference, np.asarray(vm["main"](*args).numpy()))
    return {"model": "tiny", "precision": info["precision"], "min_psnr_db": 60.0,
            "passed": numerics.passes(60.0), **numerics.to_json()}


def time_sd15(folders: dict[str, Path], repeat: int,
              rounds: int = 3) -> tuple[dict, dict[str, tuple[Any, list]]]:
    """Time PyTorch eager fp16 and each TVM fp16 build of ``folders`` (label -> bundle folder,
    all of the same seed-0 sd15) on one GPU, interleaved in ``rounds``; compare every output
    with PyTorch fp32. Returns the numbers and each build's (VM, arguments)."""
    import numpy as np
    import torch

    from snapc.numerics import compare

    net, inputs, info = _unet_and_inputs(next(iter(folders.values())))
    state = net.state_dict()  # the CPU fp32 tensors: .to() and .half() give the net new ones
    torch.backends.cudnn.allow_tf32 = False  # an fp32 reference, not a TF32 one
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.device("cuda")
    cuda_inputs = [t.to(gpu) for t in inputs]
    with torch.no_grad():
        net32 = net.to(gpu)
        reference = net32(*cuda_inputs, return_dict=False)[0].float().cpu()
        net16 = net32.half()
        half_inputs = [t.half() if t.is_floating_point() else t for t in cuda_inputs]
        torch_out = net16(*half_inputs, return_dict=False)[0].float().cpu()
    net = net32 = None
    builds = {}
    for label, folder in folders.items():
        build_info = json.loads((folder / "manifest.json").read_text())["extra"]["tvm"]
        vm, args = _tvm_module(folder, inputs, build_info, _tvm_weights(state, build_info))
        out = np.asarray(vm["main"](*args).numpy(), np.float32)
        numerics = compare(reference, out).to_json()
        builds[label] = {"vm": vm, "args": args, "ms": [], "numerics": numerics,
                         "tensor_core_kernels": build_info["cuda_kernels"]["tensor_core_kernels"],
                         "kernels": build_info["cuda_kernels"]["kernels"]}
    torch_ms: list[float] = []
    for _ in range(rounds):  # interleaved, so drift of clocks and load hits every variant
        with torch.no_grad():
            torch_ms += _cuda_ms(lambda: net16(*half_inputs, return_dict=False), 3, repeat)
        for build in builds.values():
            timer = build["vm"].time_evaluator("main", build["args"][0].device, number=1,
                                               repeat=repeat, min_repeat_ms=0)
            build["ms"] += [r * 1000.0 for r in timer(*build["args"]).results]
    torch_median = float(np.median(torch_ms))
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "tvm": info["version"], "tvm_target": info["target"], "precision": info["precision"],
        "inputs": [list(t.shape) for t in inputs], "repeat": repeat, "rounds": rounds,
        "torch_eager_fp16_ms": round(torch_median, 2),
        "torch_fp16_vs_fp32": compare(reference, torch_out).to_json(), "builds": {},
    }
    for label, build in builds.items():
        median = float(np.median(build["ms"]))
        result["builds"][label] = {
            "name": TIMED[label], "median_ms": round(median, 2),
            "over_torch": round(median / torch_median, 2),
            "kernels": build["kernels"], "tensor_core_kernels": build["tensor_core_kernels"],
            "vs_torch_fp32": build["numerics"],
            "passed": build["numerics"]["psnr_db"] >= FP16_GATE_DB}
    return result, {label: (build["vm"], build["args"]) for label, build in builds.items()}


def main() -> None:
    """Dispatch ``prepare`` (build here) or ``run`` (time on the GPU)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--bundle", type=Path, default=REPO / ".whl" / "tvm_cuda")
    parser.add_argument("--build-dir", type=Path, default=REPO / "out")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--kernels", action="store_true",
                        help="run: also print each TVM build's heaviest kernels")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    if args.step == "prepare":
        prepare(bundle, args.build_dir)
        return
    if not args.inner:
        site = _unpack(bundle)
        env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1",
               "PYTHONPATH": os.pathsep.join(
                   [str(site), *filter(None, [os.environ.get("PYTHONPATH")]), str(REPO)])}
        code = subprocess.run([sys.executable, __file__, "run", "--bundle", str(bundle),
                               "--repeat", str(args.repeat), "--inner",
                               *(["--kernels"] if args.kernels else [])], env=env).returncode
        shutil.rmtree(site, ignore_errors=True)
        raise SystemExit(code)
    import tvm

    _load_tvm_cuda_runtime(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so")
    check = check_tiny(bundle / "tiny")
    print(json.dumps(check))
    if not check["passed"]:
        raise SystemExit(f"tiny through TVM CUDA: PSNR {check['psnr_db']:.1f} dB < 60 dB")
    result, vms = time_sd15({label: bundle / label for label in TIMED}, args.repeat)
    print(f"GPU: {result['gpu']}")
    print("| SD-1.5 UNet, batch 1, 64x64 latent | median ms | vs eager | PSNR vs fp32 |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| PyTorch {result['torch']} eager fp16 | {result['torch_eager_fp16_ms']} | 1.00x | "
          f"{result['torch_fp16_vs_fp32']['psnr_db']:.1f} dB |")
    for build in result["builds"].values():
        print(f"| {build['name']} | {build['median_ms']} | {build['over_torch']}x | "
              f"{build['vs_torch_fp32']['psnr_db']:.1f} dB |")
    print(json.dumps(result))
    if args.kernels:  # where each build's time goes (bench/tvm_kernels.py), heaviest first
        from bench.tvm_kernels import kernel_times

        for label, (vm, vm_args) in vms.items():
            times = kernel_times(vm, vm_args, vm_args[0].device, calls=5)
            heaviest = sorted(times["kernels"].items(), key=lambda kv: -kv[1]["ms"])[:25]
            print(json.dumps({"kernels_of": label, "plain_ms": times["plain_ms"],
                              "instrumented_ms": times["instrumented_ms"],
                              "heaviest": dict(heaviest)}))
    failed = [label for label, build in result["builds"].items() if not build["passed"]]
    if failed:
        raise SystemExit(f"{', '.join(failed)}: output below {FP16_GATE_DB} dB vs PyTorch fp32")


if __name__ == "__main__":
    main()
