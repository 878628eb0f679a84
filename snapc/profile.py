"""`snapc profile`: time every block in isolation and the whole model; write a latency table.

Each block is cut out of the FX graph as a standalone module (``profile_blocks.py``), fed
tensors of its real shapes, and timed on the chosen backend (warm-up, repeats, median and
10th/90th percentiles). The whole model is timed the same way; whole minus the sum of blocks
is kept in the table as non-block cost. The table also stores each block's roofline work so
that ``snapc.cost.fitting`` can calibrate a device profile from the table alone.

Library code: progress goes to a callback, nothing is printed.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from snapc.cost.model import TORCH_DTYPE_NAMES, block_work, graph_dtype, graph_signature
from snapc.cost.model import non_block_work as graph_non_block_work
from snapc.cost.table import BlockEntry, LatencyTable, summarize
from snapc.errors import SnapcError, UnknownNameError
from snapc.graph import Graph
from snapc.profile_backends import (
    CoreMLTimer,
    OrtTimer,
    Runner,
    Timer,
    TorchTimer,
    time_calls,
)
from snapc.profile_blocks import isolate_blocks

__all__ = ["ProfileOptions", "BACKENDS", "profile_graph", "make_timer", "default_device_name"]

BACKENDS = ("torch", "onnxruntime", "tvm", "coreml")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProfileOptions:
    """How to profile.

    ``backend``: torch, onnxruntime, tvm or coreml. ``device``: cpu or cuda (torch and
    onnxruntime). ``rpc`` ("HOST:PORT") and ``target`` (a snapc TVM target name) for tvm.
    ``device_name``: the device the table is for (default: local-cpu, h100/cuda, the TVM
    target). ``blocks``: only these blocks (default all). ``whole_model``: also time the model.
    ``rpc_timeout_s``: how long to wait for the RPC server to answer. ``threads``: torch CPU
    threads while timing (1 is steadier on a shared machine; None keeps torch's default).
    ``clock``: "wall" or "cpu" (torch on cpu with one thread: the thread's CPU time, which
    ignores time lost to other processes). ``min_sample_ms``: each sample is the mean of as
    many back-to-back calls as fill this time (at most 100), so sub-millisecond GPU blocks are
    not dominated by the first call of a round; 0 means one call per sample.
    ``cuda_graphs``: torch on cuda only; time each block as a captured CUDA graph (GPU time
    of back-to-back replays, see ``TorchTimer``) instead of eager calls.
    """

    backend: str = "torch"
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 2
    rpc: str | None = None
    target: str | None = None
    device_name: str | None = None
    blocks: tuple[str, ...] | None = None
    whole_model: bool = True
    seed: int = 0
    rpc_timeout_s: float = 10.0
    compute_units: str = "CPU_AND_NE"
    threads: int | None = None
    clock: str = "wall"
    min_sample_ms: float = 0.0
    cuda_graphs: bool = False


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run torch CPU ops with ``count`` threads inside the block (None: leave it)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device_name(options: ProfileOptions) -> str:
    """Return the device name the table is keyed by when ``options.device_name`` is unset."""
    if options.device_name:
        return options.device_name
    if options.backend == "tvm":
        return f"tvm-{options.target or 'x86'}"
    if options.backend == "coreml":
        return f"coreml-{options.compute_units.lower()}"
    if options.device == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        return "h100" if "H100" in name else "cuda"
    return "local-cpu"


def make_timer(options: ProfileOptions) -> Timer:
    """Return the timer for ``options.backend``; raise UnknownNameError for other names."""
    if options.cuda_graphs and options.backend != "torch":
        raise SnapcError("--cuda-graphs needs --backend torch --device cuda")
    if options.backend == "torch":
        with _threads(options.threads):
            return TorchTimer(options.device, options.clock, options.cuda_graphs,
                              options.min_sample_ms)
    if options.backend == "onnxruntime":
        return OrtTimer(options.device)
    if options.backend == "tvm":
        from snapc.profile_tvm import TvmRpcTimer

        return TvmRpcTimer(options.rpc, options.target or "x86", options.rpc_timeout_s)
    if options.backend == "coreml":
        return CoreMLTimer(options.compute_units)
    raise UnknownNameError("backend", options.backend, list(BACKENDS))


def _machine(timer: Timer, options: ProfileOptions) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "backend": timer.name,
        "backend_device": options.device,
    }
    if options.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if options.rpc:
        info["rpc"], info["target"] = options.rpc, options.target
    return info


def _batched(runner: Runner, options: ProfileOptions) -> Runner:
    """Warm ``runner`` up; return it, or when one call is shorter than
    ``options.min_sample_ms`` a runner returning the mean of enough back-to-back calls."""
    time_calls(runner, options.warmup, 0)
    if not options.min_sample_ms or options.cuda_graphs:  # replays already fill a sample
        return runner
    calls = min(100, math.ceil(options.min_sample_ms / max(runner(), 1e-3)))
    if calls <= 1:
        return runner

    def mean_of_calls() -> float:
        return sum(runner() for _ in range(calls)) / calls

    return mean_of_calls


def profile_graph(graph: Graph, options: ProfileOptions = ProfileOptions(),
                  progress: Progress | None = None,
                  timer: Timer | None = None) -> LatencyTable:
    """Time every block of ``graph`` in isolation and the whole model; return the table.

    Every block (and the model) is prepared and warmed up first, then timed in interleaved
    rounds. ``progress(label, done, total)`` is called before each step and once at the end.
    ``graph`` is not changed. Raises SnapcError subclasses for a missing backend, a bad
    device or an RPC server that does not answer.
    """
    progress = progress or (lambda label, done, total: None)
    timer = timer or make_timer(options)
    dtype = graph_dtype(graph)
    torch_dtype = TORCH_DTYPE_NAMES[dtype]
    names = list(options.blocks) if options.blocks is not None else None
    isolated = isolate_blocks(graph, names, options.seed)
    labels = [item.name for item in isolated] + (["whole model"] if options.whole_model else [])
    total = len(labels) * (1 + options.repeats)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with _threads(options.threads):
        runners = []
        for done, item in enumerate(isolated):
            progress(f"prepare + warm up {item.name}", done, total)
            runners.append(_batched(timer.prepare(item.name, item.module, item.inputs),
                                    options))
        if options.whole_model:
            progress("prepare + warm up whole model", len(isolated), total)
            runners.append(_batched(timer.prepare("whole model", graph.module(),
                                                  graph.example_inputs), options))
        samples: list[list[float]] = [[] for _ in runners]
        # Interleaved rounds: a load spike from other processes hits every block alike
        # instead of all repeats of one block.
        for round_ in range(options.repeats):
            for i, runner in enumerate(runners):
                progress(f"round {round_ + 1}/{options.repeats}: {labels[i]}",
                         len(runners) * (round_ + 1) + i, total)
                samples[i].append(runner())
    entries: list[BlockEntry] = []
    for item, block_samples in zip(isolated, samples, strict=False):
        block = graph.blocks[item.name]
        entries.append(BlockEntry(block.name, block.stage, block.signature(torch_dtype),
                                  summarize(block_samples), block.macs,
                                  tuple(block_work(graph, block))))
    whole = summarize(samples[-1]) if options.whole_model else None
    progress("done", total, total)
    meta = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "repeats": options.repeats, "warmup": options.warmup, "rounds": "interleaved",
        "clock": "cuda-events" if options.cuda_graphs else options.clock,
        "cuda_graphs": options.cuda_graphs,
        "threads": options.threads or torch.get_num_threads(),
        "machine": _machine(timer, options),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "profile_s": round(time.perf_counter() - started, 1),
        "input_shapes": [list(t.shape) for t in graph.example_inputs],
        "removed_blocks": list(graph.removed),
    }
    return LatencyTable(
        device=default_device_name(options), backend=timer.name,
        model_name=graph.source.name, model_signature=graph_signature(graph, dtype),
        dtype=torch_dtype, blocks=tuple(entries), whole_model=whole,
        non_block_work=tuple(graph_non_block_work(graph)) if whole else (), meta=meta)
