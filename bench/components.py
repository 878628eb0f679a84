"""Per-component figures of a whole pipeline compiled with `snapc compile --components`:
compile time, artifact size, peak resident memory, and (ONNX) onnxruntime time per call, for
the SD-1.5-layout random-weight pipeline (``sd15-pipeline``) on onnx and coreml, side by side
in one run.

Each (target, component) compiles in its own process (``--worker``), so its peak RSS is its
own (sampled from /proc every 20 ms; ru_maxrss agrees); Core ML is converted and verified
with snapc's numpy MIL interpreter (Core ML itself runs only on macOS), ONNX components are
then timed on onnxruntime CPU in another process (median of ``--repeats`` calls after a
warm-up, with that process's peak RSS).

Run: flock /tmp/snapc_heavy.lock python bench/components.py [--components text_encoder,
vae_decoder] [--latent 32] [--targets onnx,coreml] [--write-results]
Figures: bench/out/components.json; --write-results: bench/RESULTS.md ("Components").
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "components.json"


class PeakRss:
    """Samples this process's resident memory every 20 ms and keeps the peak (bytes)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def current() -> int:
        """Return the resident set size in bytes."""
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.02)

    def stop(self) -> int:
        """Stop sampling; return the peak (the larger of the samples and ru_maxrss)."""
        self._stop.set()
        return max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def compile_worker(model: str, target: str, component: str, latent: int, out: Path) -> dict:
    """Compile one component in this process; return its figures."""
    from snapc.compiler import CompileOptions
    from snapc.components import compile_components

    rss = PeakRss()
    start = time.perf_counter()
    result = compile_components(CompileOptions(model=model, target=target, out=out,
                                               latent=latent, force=True), [component])
    seconds = time.perf_counter() - start
    peak = rss.stop()
    manifest = result.results[component].manifest
    return {"target": target, "component": component, "compile_s": round(seconds, 1),
            "stages_s": {k: round(v, 1) for k, v in result.results[component].timings.items()},
            "peak_rss_gib": round(peak / 2**30, 2), "artifact_bytes": _size(out / component),
            "params": manifest.model.get("params"),
            "inputs": [s.to_json() for s in manifest.inputs],
            "psnr_db": round(float(manifest.verification["psnr_db"]), 1),
            "verified_by": manifest.verification.get("runtime")}


def run_worker(folder: Path, component: str, repeats: int) -> dict:
    """Time one compiled ONNX component on onnxruntime CPU; return ms per call and RSS."""
    import torch

    from snapc.runtime import OnnxFunction

    rss = PeakRss()
    entry = next(c for c in json.loads((folder / "manifest.json").read_text())["components"]
                 if c["name"] == component)
    inputs = []
    for spec in entry["inputs"]:
        shape = tuple(spec["shape"])
        inputs.append(torch.ones(shape, dtype=torch.int64) if spec["dtype"] == "int64"
                      else torch.randn(shape))
    function = OnnxFunction(folder / entry["files"]["model"], [i["name"] for i in
                                                               entry["inputs"]], entry["batch"])
    function(*inputs)  # warm-up (and session start)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*inputs)
        times.append((time.perf_counter() - start) * 1000)
    return {"ms_per_call": round(statistics.median(times), 1),
            "all_ms": [round(t, 1) for t in times],
            "runtime_peak_rss_gib": round(rss.stop() / 2**30, 2)}


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    lines = ["| target | component | params | compile s | peak RSS GiB | artifact MB | verified "
             "(PSNR dB, by) | onnxruntime ms/call | runtime RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = r.get("run") or {}
        lines.append(f"| {r['target']} | {r['component']} | {r['params'] / 1e6:.1f} M | "
                     f"{r['compile_s']:.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['artifact_bytes'] / 1e6:.0f} | {r['psnr_db']:.1f}, "
                     f"{r['verified_by']} | {run.get('ms_per_call', '-')} | "
                     f"{run.get('runtime_peak_rss_gib', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-pipeline")
    parser.add_argument("--targets", default="onnx,coreml")
    parser.add_argument("--components", default="unet,text_encoder,vae_decoder")
    parser.add_argument("--latent", type=int, default=64, help="latent size (UNet, decoder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("TARGET", "COMPONENT", "OUT"))
    parser.add_argument("--run", nargs=2, metavar=("FOLDER", "COMPONENT"))
    args = parser.parse_args()
    if args.worker:
        target, component, out = args.worker
        print(json.dumps(compile_worker(args.model, target, component, args.latent,
                                        Path(out))))
        return
    if args.run:
        print(json.dumps(run_worker(Path(args.run[0]), args.run[1], args.repeats)))
        return

    from results import machine, write_section

    where = machine()
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            for component in args.components.split(","):
                out = Path(tmp) / f"{target}-{component}"
                print(f"compiling {component} for {target} ...", flush=True)
                row = _child(["--model", args.model, "--latent", str(args.latent),
                              "--worker", target, component, str(out)])
                if target == "onnx":
                    row["run"] = _child(["--repeats", str(args.repeats), "--run", str(out),
                                         component])
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = (f"python bench/components.py --components {args.components} --latent "
               f"{args.latent} --targets {args.targets} --repeats {args.repeats}"
               + (" --write-results" if args.write_results else ""))
    record = {"command": command, "model": args.model, "latent": args.latent,
              "components": args.components, "targets": args.targets, "machine": where,
              "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.perf_counter() - start),
              "rows": rows}
    runs = _runs()
    runs = [r for r in runs if (r["model"], r["latent"], r["components"], r["targets"])
            != (args.model, args.latent, args.components, args.targets)] + [record]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(_table(rows))
    if args.write_results:
        write_section("Components (SD-1.5-layout pipeline)", _section(runs))


def _runs() -> list[dict]:
    """Return the runs recorded in bench/out/components.json (one per model, latent,
    components and targets; a new run replaces its own)."""
    if not OUT.is_file():
        return []
    data = json.loads(OUT.read_text())
    return data.get("runs", [data] if "rows" in data else [])


def _section(runs: list[dict]) -> str:
    parts = ["""Model `sd15-pipeline` (random weights: SD-1.5's public UNet, CLIP ViT-L/14 text
encoder and AutoencoderKL configs), batch 1 (the UNet 2, under CFG). Each row is its own
process: compile = load + trace + passes + emit + verify against PyTorch (Core ML: converted
and verified with snapc's numpy MIL interpreter; Core ML itself runs only on macOS); ONNX
components are then timed on onnxruntime CPU (median of the calls after a warm-up) in another
process, with that process's peak RSS. Figures: bench/out/components.json."""]
    for run in runs:
        latent = run["latent"]
        parts.append(f"""`{run.get('command', 'python bench/components.py')}` ({run['date']}, whole
run {run['wall_s']} s); machine: {run['machine']}. Latent {latent}x{latent} (decoder output
{latent * 8}x{latent * 8}).

{_table(run['rows'])}""")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
