"""Where a TVM artifact's time goes: per-kernel time of one model call (x86 here, cuda on a GPU).

Loads an artifact folder written by ``snapc compile --target x86|cuda`` into a Relax VM and
times every call the VM makes, through the VM's instrument hook (TVM 0.27's Relax VM has no
profiler): a kernel's time is the wall time from just before to just after its call, with the
device synchronised on both sides for cuda. Calls are grouped by symbol; the table gives calls
per model call, time per model call and share, and the rest of the whole call (allocations,
the VM's own instructions) as "outside kernels". Instrumented calls are slower than plain
ones (the hook is a Python call), so shares matter more than the sum::

    snapc compile shapes --target x86 --mcpu native -o out/shapes-x86 --force
    python bench/tvm_kernels.py out/shapes-x86 --top 25

Writes ``bench/out/tvm_kernels_<model>_<target>.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def load_vm(folder: Path) -> tuple[Any, list[Any], Any, dict[str, Any]]:
    """Return (VM, arguments on the device, device, manifest) of an x86 or cuda artifact."""
    import tvm
    from safetensors.numpy import load_file
    from tvm.runtime.vm import VirtualMachine  # the runtime-only TVM of a GPU machine has it

    from snapc.targets.tvm_rpc import _inputs

    manifest = json.loads((folder / "manifest.json").read_text())
    info = manifest["extra"]["tvm"]
    if info["device"] == "cuda":
        from snapc.targets.tvm_cuda import use_precompiled_kernels

        use_precompiled_kernels(folder)
        device = tvm.cuda(0)
    elif info["device"] == "cpu" and "aarch64" not in json.dumps(info["target"]):
        device = tvm.cpu(0)
    else:
        raise SystemExit(f"{folder}: a {manifest['target']} artifact cannot run on this machine")
    if not device.exist:
        raise SystemExit(f"{folder}: no {info['device']} device on this machine")
    vm = VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), device)
    weights = load_file(str(folder / "params.safetensors"))
    args = [tvm.runtime.tensor(a, device) for a in _inputs(manifest, seed=0)]
    args += [tvm.runtime.tensor(weights[n], device) for n in info["param_order"]]
    return vm, args, device, manifest


def kernel_times(vm: Any, args: list[Any], device: Any, calls: int) -> dict[str, Any]:
    """Return per-symbol {calls, ms} per model call (mean over ``calls`` instrumented calls)
    and the plain and instrumented whole-call times in ms."""
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
        device.sync()
        if before:
            started.append(time.perf_counter())
        else:
            totals[symbol] += time.perf_counter() - started.pop()
            counts[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    def whole() -> float:
        start = time.perf_counter()
        vm["main"](*args)
        device.sync()
        return (time.perf_counter() - start) * 1e3

    for _ in range(3):
        whole()
    plain = statistics.median(whole() for _ in range(calls))
    vm.set_instrument(instrument)
    instrumented = statistics.median(whole() for _ in range(calls))
    kernels = {s: {"calls": counts[s] / calls, "ms": totals[s] * 1e3 / calls} for s in totals}
    return {"plain_ms": plain, "instrumented_ms": instrumented, "kernels": kernels}


def _kind(symbol: str) -> str:
    """Return a kernel's family from its fused name (``fused_conv2d3_add1`` -> conv2d)."""
    for kind in ("conv2d", "matmul", "group_norm", "layer_norm", "softmax", "vm.builtin"):
        if kind in symbol:
            return kind
    return "other"


def main() -> None:
    """Time one artifact's kernels and print the heaviest, with a per-family summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (args.artifact / "manifest.json").is_file():
        raise SystemExit(f"{args.artifact} has no manifest.json: give a snapc TVM artifact")
    vm, vm_args, device, manifest = load_vm(args.artifact)
    result = kernel_times(vm, vm_args, device, args.calls)
    kernels = sorted(result["kernels"].items(), key=lambda kv: -kv[1]["ms"])
    inside = sum(k["ms"] for _, k in kernels)
    total = result["instrumented_ms"]
    print(f"{manifest['model']['name']} -> {manifest['target']}: plain call "
          f"{result['plain_ms']:.2f} ms, instrumented {total:.2f} ms, in kernels "
          f"{inside:.2f} ms ({len(kernels)} symbols)")
    print("| kernel | calls | ms | share |\n| --- | ---: | ---: | ---: |")
    for symbol, k in kernels[:args.top]:
        print(f"| {symbol} | {k['calls']:.0f} | {k['ms']:.3f} | {k['ms'] / total:.1%} |")
    print(f"| outside the calls | | {total - inside:.3f} | {(total - inside) / total:.1%} |")
    families: dict[str, float] = defaultdict(float)
    for symbol, k in kernels:
        families[_kind(symbol)] += k["ms"]
    print("by family: " + ", ".join(f"{f} {ms:.2f} ms" for f, ms in
                                    sorted(families.items(), key=lambda kv: -kv[1])))
    out = args.json or (HERE / "out" / f"tvm_kernels_{manifest['model']['name']}_"
                        f"{manifest['target']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result["machine"] = {"argv": sys.argv[1:], "target": manifest["extra"]["tvm"]["target"]}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
