"""``snapc tune``: MetaSchedule tuning of a model's kernels for one TVM target and one device.

``tune_model`` checks the request, traces the model, and runs the search in a child process
(``snapc.targets.tvm_tune``) on a working copy of the records folder; only when the child ends
well does the copy replace the folder (``atomic_output_dir``), with ``tuning.json`` updated:
a crash or a failed search is one SnapcError line naming the signal and the stage, and the
records folder is left as it was. The records folder format is snapc.targets.tvm_tuning's.

Measurements run on this machine (LocalRunner) or, with ``rpc`` (a TVM RPC tracker,
``HOST:PORT``) and ``device_key``, on the devices registered under that key
(``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`` on each).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snapc.errors import SnapcError

__all__ = ["TuneOptions", "TuneResult", "check_tune", "tune_graph", "tune_model"]

LOCAL = "local"


@dataclass(frozen=True)
class TuneOptions:
    """What ``snapc tune`` tunes, for which target and device, and how long.

    ``trials``: measured candidates over all kernels (MetaSchedule ``max_trials_global``);
    ``trials_per_task`` caps one kernel (default: ``trials``); ``rpc`` a TVM RPC tracker
    ``HOST:PORT`` with ``device_key`` the key its servers registered; ``cores`` the device's
    cores (default: this machine's); ``timeout_s`` bounds the whole search; ``max_kernels``
    tunes only that many kernels not yet in the records, the heaviest (FLOPs x occurrences);
    ``build_workers`` compiles that many candidates at once (1 keeps a 2-core machine usable).
    """

    model: str
    target: str
    out: Path
    trials: int = 64
    trials_per_task: int | None = None
    trials_per_iter: int = 16
    precision: str | None = None
    mcpu: str | None = None
    rpc: str | None = None
    device_key: str | None = None
    rpc_workers: int = 1
    cores: int | None = None
    batch: int = 1
    latent: int | None = None
    arch: str | None = None
    seed: int = 0
    host_os: str = "auto"
    cuda_arch: str = "sm_90"
    timeout_s: float = 6 * 3600.0
    max_kernels: int | None = None
    build_workers: int = 1

    @property
    def device(self) -> str:
        """The device key the records are filed under."""
        return self.device_key if self.rpc is not None else LOCAL


@dataclass
class TuneResult:
    """The records folder written and what the search did."""

    out: Path
    index: dict[str, Any]
    summary: dict[str, Any]
    seconds: float


def _tvm_target(options: TuneOptions) -> Any:
    """Return (snapc TVM target spec, TVM target as compile builds it, cross compiler)."""
    from snapc.targets.tvm import TvmOptions, _tvm_target
    from snapc.targets.tvm_targets import find_toolchain, target_spec

    spec = target_spec(options.target)
    toolchain = find_toolchain(options.host_os) if spec.aarch64 else None
    tvm_options = TvmOptions(target=spec.name, precision=options.precision,
                             host_os=options.host_os, cuda_arch=options.cuda_arch,
                             mcpu=options.mcpu)
    return spec, _tvm_target(spec, toolchain, tvm_options), toolchain


def check_tune(options: TuneOptions) -> dict[str, Any] | None:
    """Raise a one-line SnapcError for a bad request before any long work; return the index of
    an existing records folder at ``options.out`` (tuned into further), else None."""
    from snapc.targets.tvm import _check_tvm
    from snapc.targets.tvm_tuning import check_ffi, check_records, read_index

    if options.trials < 1 or options.trials_per_iter < 1:
        raise SnapcError("--trials and the trials per round must be at least 1")
    if options.build_workers < 1:
        raise SnapcError("--build-workers: the tuning's build workers must be at least 1")
    if options.max_kernels is not None and options.max_kernels < 1:
        raise SnapcError("--max-kernels must be at least 1")
    if options.precision not in (None, "fp16", "fp32"):
        raise SnapcError(f"--precision must be fp16 or fp32, got '{options.precision}'")
    if (options.rpc is None) != (options.device_key is None):
        raise SnapcError("--rpc HOST:PORT (a TVM RPC tracker) and --device-key KEY go together")
    if options.rpc is not None:
        from snapc.profile_tvm import parse_rpc

        parse_rpc(options.rpc)
    _check_tvm()
    check_ffi()
    spec, target, _ = _tvm_target(options)
    if options.rpc is None and spec.name != "x86" and not (spec.device == "cuda"
                                                            and _cuda_here()):
        raise SnapcError(f"target {spec.name} cannot run on this machine: tune it on the device "
                         "through a TVM RPC tracker with --rpc HOST:PORT --device-key KEY")
    out = Path(options.out)
    if not out.parent.is_dir():
        raise SnapcError(f"cannot write {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise SnapcError(f"{out} exists and is not a records folder; choose another -o")
    if not out.exists() or not any(out.iterdir()):
        return None
    read_index(out)
    return check_records(out, spec.name, target, options.device)


def _cuda_here() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


def _spec(options: TuneOptions, program: Path, work: Path, records: Path) -> dict[str, Any]:
    from snapc.profile_tvm import parse_rpc

    spec, target, toolchain = _tvm_target(options)
    target_dict = json.loads(str(target))
    cores = options.cores or _physical_cores()
    if target.kind.name == "llvm":
        target_dict["num-cores"] = cores  # MetaSchedule's CPU rules need it
    rpc = None
    if options.rpc is not None:
        host, port = parse_rpc(options.rpc)
        rpc = {"host": host, "port": port, "key": options.device_key,
               "workers": options.rpc_workers}
    return {
        "program": str(program), "precision": options.precision or spec.default_precision,
        "target": json.dumps(target_dict), "records": str(records), "work": str(work),
        "trials": options.trials, "trials_per_task": options.trials_per_task or options.trials,
        "trials_per_iter": min(options.trials_per_iter, options.trials), "seed": options.seed,
        "threads": cores if options.rpc is None else "physical",
        "build_workers": options.build_workers,
        "build_timeout_s": 120.0, "run_timeout_s": 60.0, "number": 3, "repeat": 1,
        "min_repeat_ms": 20 if target.kind.name == "llvm" else 0,
        "cross_compiler": toolchain.compiler if toolchain else None, "rpc": rpc,
        "max_kernels": options.max_kernels}


def _physical_cores() -> int:
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def _describe_failure(proc: subprocess.CompletedProcess[str]) -> str:
    from snapc.targets.tvm_tune import STAGE_MARK

    stages = [ln[len(STAGE_MARK):] for ln in proc.stderr.splitlines()
              if ln.startswith(STAGE_MARK)]
    where = f" while {stages[-1]}" if stages else ""
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"MetaSchedule crashed the tuning process with {name}{where}"
    lines = [ln.strip() for ln in proc.stderr.splitlines()
             if ln.strip() and not ln.startswith(STAGE_MARK)]
    last = lines[-1][:300] if lines else "no output"
    return f"tuning failed{where} (exit status {proc.returncode}: {last})"


def tune_graph(graph: Any, options: TuneOptions,
               progress: Callable[[str], None] = lambda _: None) -> TuneResult:
    """Tune ``graph``'s kernels into ``options.out`` (created, or extended when it holds records
    for the same target and device) and return what was done. Raises SnapcError when the
    request is bad or the search crashes or fails; the folder is then unchanged."""
    import torch

    from snapc.artifacts import atomic_output_dir
    from snapc.targets.tvm_tuning import INDEX, TUNING_RECORDS, WORKLOADS, count_records

    start = time.perf_counter()
    existing = check_tune(options)
    out = Path(options.out)
    with atomic_output_dir(out, force=True) as tmp, \
            tempfile.TemporaryDirectory(prefix="snapc-tune-") as scratch:
        for name in (WORKLOADS, TUNING_RECORDS):
            if existing is not None:
                shutil.copyfile(out / name, tmp / name)
        program = Path(scratch) / "program.pt2"
        torch.export.save(graph.program, program)
        spec = _spec(options, program, Path(scratch) / "work", tmp)
        (Path(scratch) / "spec.json").write_text(json.dumps(spec))
        progress(f"tuning in a child process ({options.trials} trials, device "
                 f"{options.device})")
        try:
            proc = subprocess.run(  # the search runs apart: a native crash must not end snapc
                [sys.executable, "-m", "snapc.targets.tvm_tune", str(Path(scratch) / "spec.json")],
                capture_output=True, text=True, timeout=options.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise SnapcError(f"tuning did not finish in {options.timeout_s:.0f} s; lower "
                             f"--trials (records in {out} are unchanged)") from None
        if proc.returncode != 0:
            raise SnapcError(f"{_describe_failure(proc)}; records in {out} are unchanged")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        summary["stages"] = [ln for ln in proc.stderr.splitlines() if "snapc-stage: " in ln]
        index = _merged_index(existing, options, spec, summary, graph)
        index["workloads"], index["records"] = count_records(tmp)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return TuneResult(out, index, summary, time.perf_counter() - start)


def _merged_index(existing: dict[str, Any] | None, options: TuneOptions, spec: dict[str, Any],
                  summary: dict[str, Any], graph: Any) -> dict[str, Any]:
    index = dict(existing or {"target": options.target, "tvm_target": json.loads(spec["target"]),
                              "device": options.device, "precision": spec["precision"],
                              "models": [], "kernels": {}})
    kernels = dict(index.get("kernels", {}))
    for task in summary["tasks"]:
        if task["best_us"] is not None:
            kernels[task["workload_hash"]] = {"name": task["name"], "best_us": task["best_us"]}
    model = {"model": options.model, "name": graph.source.name, "batch": options.batch,
             "tasks": len(summary["tasks"]),
             "reused": sum(t["reused"] for t in summary["tasks"]), "trials": options.trials,
             "cost_model": summary["cost_model"], "search_s": round(summary["search_s"], 1),
             "options": {k: str(v) if isinstance(v, Path) else v
                         for k, v in asdict(options).items()}}
    index["models"] = [*index.get("models", []), model]
    index["kernels"] = kernels
    return index


def tune_model(options: TuneOptions,
               progress: Callable[[str], None] = lambda _: None) -> TuneResult:
    """Check ``options``, load and trace ``options.model``, then ``tune_graph`` it."""
    from snapc.compiler import load_graph

    check_tune(options)
    progress(f"loading and tracing {options.model}")
    graph = load_graph(options.model, arch=options.arch, batch=options.batch,
                       latent=options.latent, seed=options.seed)
    return tune_graph(graph, options, progress)
