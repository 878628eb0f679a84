"""Probe a TVM lowering that may crash the process, in a subprocess.

Two lowerings have crashed apache-tvm 0.27 outright (SIGSEGV, which no ``try`` can catch):
the Adreno texture pipeline (NCHW4c, ``qcom/adreno-opencl-texture``) in ``ConvertLayout``,
and dlight's tensor-core (MMA) matmul schedules on CUDA in ``s_tir`` Tensorize (that one with
apache-tvm-ffi 0.1.15, in its ``ToJSONGraph``; the pinned 0.1.14 survives it). So a
child process imports the same program, converts it the same way and runs the lowering,
printing each pass name before running it; when the child dies, the last name says where.
Only when the child succeeds does the caller lower that way in its own process. (Modules
cannot be handed over as JSON: ``tvm.ir.save_json`` segfaults on these modules in 0.27, so
the child re-imports the program.)

Run as ``python -m snapc.targets.tvm_probe PROGRAM.pt2 PRECISION TARGET.json TENSOR_CORES``
(internal).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import tvm

__all__ = ["LoweringProbe", "probe_isolated"]

_PASS_MARK = "snapc-pass: "


@dataclass(frozen=True)
class LoweringProbe:
    """Whether a lowering survived in a child process, and why not."""

    ok: bool
    reason: str
    seconds: float


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"crashed the process with {signal.Signals(-code).name}"
        except ValueError:
            return f"crashed the process with signal {-code}"
    return f"failed (exit status {code})"


def _last_pass(stderr: str) -> str | None:
    marks = [line[len(_PASS_MARK):] for line in stderr.splitlines()
             if line.startswith(_PASS_MARK)]
    return marks[-1] if marks else None


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith(_PASS_MARK)]
    return lines[-1][:200] if lines else "no output"


def probe_isolated(program: torch.export.ExportedProgram, precision: str,
                   target: tvm.target.Target, tensor_cores: bool = False,
                   timeout_s: float = 1800.0) -> LoweringProbe:
    """Import ``program`` at ``precision`` and lower it for ``target`` in a child process
    (``tensor_cores``: with dlight's MMA schedules on CUDA); return whether that worked, or
    why not (signal or exit status, the TVM pass that was running, the last error line)."""
    import torch

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snapc-tvm-probe-") as tmp:
        folder = Path(tmp)
        torch.export.save(program, folder / "program.pt2")
        (folder / "target.json").write_text(str(target))
        command = [sys.executable, "-m", "snapc.targets.tvm_probe",
                   str(folder / "program.pt2"), precision, str(folder / "target.json"),
                   str(int(tensor_cores))]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return LoweringProbe(False, f"did not finish in {timeout_s:.0f} s",
                                time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return LoweringProbe(True, "ok", seconds)
    where = _last_pass(proc.stderr)
    reason = _describe_exit(proc.returncode) + (f" in TVM pass {where}" if where else "")
    if proc.returncode > 0:
        reason += f" ({_last_error_line(proc.stderr)})"
    return LoweringProbe(False, reason, seconds)


def _child(program_path: str, precision: str, target_path: str, tensor_cores: str) -> None:
    """Import, convert and lower as the parent would, naming each pass on stderr first."""
    import torch
    import tvm

    from snapc.targets.tvm_build import import_graph, lower, to_fp16

    @tvm.instrument.pass_instrument
    class _NamePasses:
        def run_before_pass(self, _mod: tvm.ir.IRModule, info: tvm.transform.PassInfo) -> None:
            sys.stderr.write(f"{_PASS_MARK}{info.name}\n")
            sys.stderr.flush()

    imported = import_graph(torch.export.load(program_path))
    if precision == "fp16":
        imported = to_fp16(imported)
    target = tvm.target.Target(json.loads(Path(target_path).read_text()))
    lower(imported.module, target, instruments=[_NamePasses()],
          tensor_cores=tensor_cores == "1")


if __name__ == "__main__":
    _child(*sys.argv[1:5])
