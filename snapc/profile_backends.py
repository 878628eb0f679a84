"""Timers that run a module on a backend and return per-repeat latencies in ms.

- ``TorchTimer``: PyTorch eager on cpu or cuda (synchronised around every repeat); on cuda
  optionally captured once as a CUDA graph and timed by replays between CUDA events, so a
  sample is GPU time without Python's per-op dispatch.
- ``OrtTimer``: the module exported to ONNX (dynamo exporter) and run by onnxruntime.
- ``CoreMLTimer``: the module converted with coremltools and run by Core ML ``predict`` with
  the chosen compute units; Core ML can only predict on macOS, so elsewhere it raises
  ToolMissingError saying so.
- TVM over RPC lives in ``profile_tvm.py``.

A timer prepares a module once (export, compile, upload) and returns a runner: a function that
runs the module once and returns the elapsed ms. The caller decides warm-up and repeats.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from snapc.errors import SnapcError, ToolMissingError

__all__ = ["Timer", "Runner", "CLOCKS", "TorchTimer", "OrtTimer", "CoreMLTimer", "time_calls",
           "wall_clock", "graph_replays"]


Runner = Callable[[], float]


class Timer(Protocol):
    """Prepares a module for a backend; the runner runs it once and returns its ms."""

    name: str

    def prepare(self, label: str, module: nn.Module,
                inputs: tuple[torch.Tensor, ...]) -> Runner: ...


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of the calling thread: with one torch thread all compute runs on it, and
    # time spent descheduled by other processes on a shared machine is not counted.
    "cpu": time.thread_time,
}


def wall_clock(call: Callable[[], object], sync: Callable[[], None] = lambda: None,
               clock: Callable[[], float] = time.perf_counter) -> Runner:
    """Return a runner that calls ``call`` once (then ``sync``) and returns the elapsed ms
    by ``clock`` (wall time by default)."""

    def run() -> float:
        start = clock()
        call()
        sync()
        return (clock() - start) * 1e3

    return run


def time_calls(runner: Runner, warmup: int, repeats: int) -> list[float]:
    """Return ``repeats`` latencies (ms) of ``runner`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        runner()
    return [runner() for _ in range(repeats)]


class TorchTimer:
    """PyTorch eager timing on ``device`` ("cpu" or "cuda"), in inference mode.

    ``clock`` "wall" measures elapsed time; "cpu" measures the calling thread's CPU time,
    which is steadier on a shared machine but only complete with one torch thread on cpu.

    ``cuda_graphs`` (cuda only): each module is captured once as a CUDA graph; a sample is
    the mean GPU time (CUDA events) of enough back-to-back replays to fill ``min_sample_ms``
    (at least one). Eager timing of small GPU blocks measures Python's per-op dispatch, which
    hides the device's own cost and is what a deployed engine (TensorRT, CUDA graphs) avoids.
    """

    name = "torch"

    def __init__(self, device: str = "cpu", clock: str = "wall", cuda_graphs: bool = False,
                 min_sample_ms: float = 0.0) -> None:
        if clock not in CLOCKS:
            raise SnapcError(f"--clock must be one of {sorted(CLOCKS)}, got '{clock}'")
        if clock == "cpu" and (device != "cpu" or torch.get_num_threads() != 1):
            raise SnapcError("--clock cpu counts only the calling thread: use it with "
                             "--device cpu --threads 1")
        if cuda_graphs and device != "cuda":
            raise SnapcError("--cuda-graphs times CUDA graph replays: use it with "
                             "--device cuda")
        self.clock = CLOCKS[clock]
        if device == "cuda" and not torch.cuda.is_available():
            raise ToolMissingError("--device cuda needs a CUDA build of torch and a GPU; "
                                   "use --device cpu here")
        if device not in ("cpu", "cuda"):
            raise SnapcError(f"--device must be cpu or cuda, got '{device}'")
        self.device = torch.device(device)
        self.cuda_graphs = cuda_graphs
        self.min_sample_ms = min_sample_ms

    def prepare(self, label: str, module: nn.Module,
                inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Return a runner of ``module(*inputs)`` on the timer's device. ``module`` is copied
        before moving it: ``Module.to`` swaps parameter data in place, and the parameters are
        shared with the caller's graph."""
        if self.device.type != "cpu":
            module = copy.deepcopy(module).to(self.device)
        args = tuple(t.to(self.device) for t in inputs)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def call() -> None:
            with torch.inference_mode():
                module(*args)

        if self.cuda_graphs:
            try:
                return graph_replays(call, self.min_sample_ms)
            except RuntimeError as exc:  # an op that syncs with the host cannot be captured
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SnapcError(f"{label} cannot be captured as a CUDA graph ({first}); "
                                 "profile it without --cuda-graphs") from exc
        return wall_clock(call, sync, self.clock)


class _GraphReplays:
    """A runner replaying a captured CUDA graph; it owns ``call`` (the module and inputs the
    graph reads by raw address), so that memory cannot be freed and reused under the graph."""

    def __init__(self, call: Callable[[], object], graph: torch.cuda.CUDAGraph) -> None:
        self.call, self.graph = call, graph
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.replays = 1

    def timed(self, replays: int) -> float:
        """Replay ``replays`` times back to back; return the mean GPU ms per replay."""
        self.start.record()
        for _ in range(replays):
            self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / replays

    def __call__(self) -> float:
        return self.timed(self.replays)


def graph_replays(call: Callable[[], object], min_sample_ms: float = 0.0,
                  max_replays: int = 1000) -> Runner:
    """Capture ``call`` as a CUDA graph; return a runner that replays it back to back and
    returns the mean GPU ms per replay between two CUDA events.

    The replay count fills ``min_sample_ms`` (1 to ``max_replays``): queued replays keep the
    GPU busy, so the CPU's submission of the first one is not counted in every replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    runner = _GraphReplays(call, graph)
    one = min(runner.timed(1) for _ in range(3))
    runner.replays = max(1, min(max_replays, math.ceil(min_sample_ms / max(one, 1e-4))))
    return runner


class OrtTimer:
    """onnxruntime timing: export to ONNX in a temporary folder, then run the session."""

    name = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            raise ToolMissingError(f"onnxruntime here has no {wanted}; install "
                                   "onnxruntime-gpu for --device cuda or use --device cpu")
        self.providers = [wanted]
        self.threads = threads

    def prepare(self, label: str, module: nn.Module,
                inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Return a runner of the ONNX export of ``module`` in an onnxruntime session."""
        import onnxruntime as ort

        names = [f"input_{i}" for i in range(len(inputs))]
        with tempfile.TemporaryDirectory(prefix="snapc-ort-") as tmp:
            path = Path(tmp) / "block.onnx"
            log = io.StringIO()
            with torch.no_grad(), contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                program = torch.onnx.export(module, inputs, dynamo=True, input_names=names,
                                            optimize=True, verbose=False, report=False)
                program.save(str(path), external_data=True)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            # the session reads the external weights while it is created, inside the folder
            session = ort.InferenceSession(str(path), opts, providers=self.providers)
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=False)}
        return wall_clock(lambda: session.run(None, feeds))


class CoreMLTimer:
    """Core ML timing with coremltools ``predict`` on the given compute units (macOS only)."""

    name = "coreml"

    def __init__(self, compute_units: str = "CPU_AND_NE") -> None:
        if platform.system() != "Darwin":
            raise ToolMissingError("Core ML profiling needs macOS: coremltools can convert "
                                   f"on {platform.system()} but only runs predict on macOS; "
                                   "run `snapc profile --backend coreml` on a Mac")
        try:
            import coremltools as ct
        except ImportError as exc:
            raise ToolMissingError(f"Core ML profiling needs coremltools ({exc}); "
                                   "pip install coremltools") from exc
        self.units = getattr(ct.ComputeUnit, compute_units)

    def prepare(self, label: str, module: nn.Module,
                inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Return a runner of the Core ML conversion of ``module`` (fp16 compute)."""
        import coremltools as ct

        names = [f"input_{i}" for i in range(len(inputs))]
        with torch.no_grad():
            traced = torch.jit.trace(module.eval(), inputs, check_trace=False)
        mlmodel = ct.convert(
            traced, inputs=[ct.TensorType(name=n, shape=tuple(t.shape))
                            for n, t in zip(names, inputs, strict=True)],
            compute_units=self.units, compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS16)
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        return wall_clock(lambda: mlmodel.predict(feeds))
