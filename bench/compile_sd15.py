"""Compile SD-1.5 (random weights) to ONNX on this CPU: time and peak RSS per stage, then
onnxruntime CPU vs PyTorch eager CPU latency of the same UNet, side by side.

Run: flock /tmp/snapc_heavy.lock python bench/compile_sd15.py [--repeats 3] [--threads 2]
Writes its figures to bench/RESULTS.md ("Compile SD-1.5 to ONNX").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from results import machine, write_section


class PeakRss:
    """Samples this process's resident memory every 20 ms; reports the peak of each stage."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        """Return the resident set size in bytes."""
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * 4096

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.02)

    def reset(self) -> None:
        """Start a new stage: the peak restarts from the current RSS."""
        self.peak = self.current()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Run the benchmark and write bench/RESULTS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--remove", nargs="*", default=["mid_block.attentions.0",
                                                         "up_blocks.3.attentions.2"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = machine()
    rss = PeakRss()
    stages: dict[str, tuple[float, float]] = {}

    def stage(name, fn):
        rss.reset()
        start = time.perf_counter()
        value = fn()
        stages[name] = (time.perf_counter() - start, rss.peak / 1024**3)
        print(f"{name}: {stages[name][0]:.1f} s, peak RSS {stages[name][1]:.2f} GiB", flush=True)
        return value

    from snapc.frontend import trace
    from snapc.models import load_model
    from snapc.passes import RemoveBlocks
    from snapc.pipeline import PassContext, Pipeline
    from snapc.targets.onnx import OnnxOptions, export

    loaded = stage("load (random init)", lambda: load_model("sd15"))
    graph = stage("trace (torch.export)", lambda: trace(loaded.module, loaded.example_inputs,
                                                        loaded.info))
    result = stage(f"passes (remove {len(args.remove)} blocks, validate)",
                   lambda: Pipeline([RemoveBlocks(args.remove)]).run(graph, PassContext()))
    out = Path(tempfile.mkdtemp(prefix="snapc-sd15-"))
    manifest = stage("ONNX emission (export + onnxsim + ORT verify)",
                     lambda: export(graph, out, OnnxOptions(threads=args.threads)))
    del result

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(out / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(graph.input_names, graph.example_inputs, strict=True)}
    module = loaded.module

    def torch_call():
        with torch.inference_mode():
            module(*loaded.example_inputs, return_dict=False)

    ort_times = _time(lambda: session.run(None, feeds), args.repeats)
    torch_times = _time(torch_call, args.repeats)
    ort_ms, torch_ms = statistics.median(ort_times) * 1e3, statistics.median(torch_times) * 1e3
    print(f"onnxruntime {ort_ms:.0f} ms, torch eager {torch_ms:.0f} ms, "
          f"ratio torch/ORT {torch_ms / ort_ms:.2f}x")
    rss.stop()

    rows = "\n".join(f"| {name} | {sec:.1f} | {gib:.2f} |" for name, (sec, gib) in stages.items())
    ver = manifest.verification
    body = f"""Machine: {where}. `python bench/compile_sd15.py --repeats {args.repeats}
--threads {args.threads}` (SD-1.5 UNet, random weights, batch 1, 64x64 latent, fp32).

| stage | wall s | peak RSS GiB |
|---|---|---|
{rows}

ONNX artifact: {manifest.extra['model_bytes'] / 1e9:.2f} GB, onnxsim {manifest.extra['onnxsim']},
verified vs PyTorch: PSNR {ver['psnr_db']:.1f} dB, max abs {ver['max_abs']:.2e}.

| runtime (CPU, {args.threads} threads) | median ms per UNet call | all runs ms |
|---|---|---|
| onnxruntime CPU EP | {ort_ms:.0f} | {', '.join(f'{t * 1e3:.0f}' for t in ort_times)} |
| PyTorch eager | {torch_ms:.0f} | {', '.join(f'{t * 1e3:.0f}' for t in torch_times)} |

PyTorch / onnxruntime latency ratio: **{torch_ms / ort_ms:.2f}x** (same inputs, same run).
"""
    write_section("Compile SD-1.5 to ONNX", body)


if __name__ == "__main__":
    main()
