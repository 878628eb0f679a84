"""Build the SD-1.5 UNet with the TVM target and record build time and peak memory.

    python bench/tvm_build_sd15.py --target mali [--model sd15] [--out out/tvm_sd15_mali]

One target per process, so that peak memory (``ru_maxrss`` of this process) belongs to that
build alone. Prints one JSON line
with the stage timings from the manifest; the numbers in bench/RESULTS.md come from it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

from snapc.artifacts import atomic_output_dir
from snapc.frontend import trace
from snapc.models import load_model
from snapc.targets.tvm import TvmOptions, export


def _peak_gib() -> dict[str, float]:
    # Only this process: a child's ru_maxrss starts at this process's size when it forks, so
    # RUSAGE_CHILDREN cannot tell the texture probe's own peak.
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    """Build one model for one TVM target and print its timings and peak memory as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"out/tvm_{args.model}_{args.target}")

    start = time.perf_counter()
    loaded = load_model(args.model)
    graph = trace(loaded.module, loaded.example_inputs, loaded.info)
    del loaded
    trace_s = time.perf_counter() - start

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    with warnings.catch_warnings(record=True) as caught, \
            atomic_output_dir(out, force=True) as tmp:
        warnings.simplefilter("always", RuntimeWarning)
        manifest = export(graph, tmp, TvmOptions(target=args.target,
                                                 precision=args.precision), progress)
        manifest.write(tmp)
    tvm_info = manifest.extra["tvm"]
    verification = manifest.verification
    print(json.dumps({
        "model": args.model, "target": args.target, "precision": tvm_info["precision"],
        "tvm_target": tvm_info["target"].get("tag") or tvm_info["target"]["kind"],
        "keys": tvm_info["target"].get("keys"), "load_trace_s": round(trace_s, 1),
        "total_s": round(time.perf_counter() - start, 1), **tvm_info["timings"], **_peak_gib(),
        "library_mib": round(tvm_info["library_bytes"] / 2**20, 1),
        "params_mib": round(tvm_info["params_bytes"] / 2**20, 1),
        "kernels": verification.get("compile", {}).get("kernels"),
        "checked_build": verification.get("checked_build"),
        "kernel_runs": [(r["kernel"], round(r.get("psnr_db", 0), 1))
                        for r in verification.get("kernel_runs", [])],
        "warnings": [str(w.message) for w in caught],
    }))


if __name__ == "__main__":
    main()
