"""Time blocks on a remote device through TVM RPC (``snapc profile --backend tvm``).

Each block module is imported into Relax (``from_exported_program``), compiled for a snapc TVM
target (``snapc.targets.tvm_targets``: x86, arm-cpu, cuda, mali, adreno; fp16 mixed precision
where the target's default precision is fp16), exported as a shared library, uploaded to the
RPC server, loaded into a Relax VM on the remote device and timed there with
``time_evaluator`` (one call per sample, so samples interleave with other blocks).

``snapc.targets.tvm_rpc.profile`` times one artifact folder per connection and returns only
mean/median/std; profiling needs one session for all blocks, per-sample times and a connect
timeout, so the remote part is done here.
"""

from __future__ import annotations

import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapc.errors import SnapcError, ToolMissingError
from snapc.profile_backends import Runner

__all__ = ["TvmRpcTimer", "RpcError", "connect", "parse_rpc"]


class RpcError(SnapcError):
    """The TVM RPC server cannot be reached or does not answer."""


def parse_rpc(rpc: str | None) -> tuple[str, int]:
    """Return (host, port) of "HOST:PORT"; raise RpcError naming the expected form."""
    host, _, port = (rpc or "").rpartition(":")
    if not host or not port.isdigit():
        raise RpcError(f"--rpc must be HOST:PORT of a TVM RPC server, got '{rpc}'; start one "
                       "with `python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`")
    return host, int(port)


def _hint(port: int) -> str:
    return (f"start a server with `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}`"
            " on the device or fix --rpc")


def connect(host: str, port: int, timeout_s: float = 10.0) -> Any:
    """Return a TVM RPC session to ``host:port``; raise RpcError when the host does not
    accept within ``timeout_s`` or accepts but does not complete TVM's handshake in time."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except TimeoutError:
        raise RpcError(f"TVM RPC server {host}:{port} did not answer within {timeout_s:g} s; "
                       f"{_hint(port)}") from None
    except OSError as exc:
        raise RpcError(f"cannot reach TVM RPC server {host}:{port} "
                       f"({exc.strerror or exc}); {_hint(port)}") from None
    from tvm import rpc

    result: dict[str, Any] = {}

    def handshake() -> None:
        try:
            result["session"] = rpc.connect(host, port)
        except Exception as exc:  # TVM raises its own error types (TVMError, RuntimeError)
            result["error"] = exc

    # tvm.rpc.connect has no connect timeout: a host that accepts TCP but never speaks the
    # protocol would block forever, so the handshake runs in a daemon thread.
    thread = threading.Thread(target=handshake, daemon=True, name="snapc-rpc-connect")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RpcError(f"{host}:{port} accepted the connection but no TVM RPC handshake came "
                       f"within {timeout_s:g} s; is it a TVM RPC server? {_hint(port)}")
    if "error" in result:
        first = str(result["error"]).strip().splitlines()
        raise RpcError(f"TVM RPC handshake with {host}:{port} failed: "
                       f"{first[-1] if first else type(result['error']).__name__}; "
                       f"{_hint(port)}")
    return result["session"]


def _remote_device(session: Any, kind: str) -> Any:
    return {"opencl": session.cl, "cuda": session.cuda, "cpu": session.cpu}[kind](0)


class TvmRpcTimer:
    """Builds each module for a snapc TVM target and times it on a remote RPC server."""

    name = "tvm"

    def __init__(self, rpc: str | None, target: str = "x86", timeout_s: float = 10.0,
                 precision: str | None = None) -> None:
        host, port = parse_rpc(rpc)
        try:
            import tvm  # noqa: F401
        except ImportError as exc:
            raise ToolMissingError(f"--backend tvm needs apache-tvm 0.27 ({exc}); "
                                   "pip install 'snapc[tvm]'") from exc
        from snapc.targets.tvm_targets import target_spec

        self.spec = target_spec(target)
        self.precision = precision
        self.session = connect(host, port, timeout_s)
        self.workdir = Path(tempfile.mkdtemp(prefix="snapc-tvm-profile-"))
        self.device = _remote_device(self.session, self.spec.device)

    def _target(self) -> Any:
        """Return the tvm Target (with host) of ``self.spec``; aarch64 targets use the
        toolchain the TVM target module finds (NDK or aarch64-linux-gnu-g++)."""
        import tvm

        from snapc.targets.tvm_targets import find_toolchain

        triple = find_toolchain().triple if self.spec.aarch64 else "x86_64-linux-gnu"
        if self.spec.device == "cpu":
            return tvm.target.Target({**(self.spec.tvm_dict or {}), "mtriple": triple})
        host = {"kind": "llvm", "mtriple": triple}
        return tvm.target.Target(self.spec.tvm_tag or self.spec.tvm_dict, host=host)

    def _build(self, label: str, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Path:
        """Compile ``module`` (weights bound as constants) for the target into ``NAME.so``.

        A small build of its own rather than ``snapc.targets.tvm.export``: that one writes a
        verified artifact folder for a whole Graph (weights separate, PSNR checks), far more
        than timing needs, and its pipeline was still changing while this was written.
        """
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        from snapc.targets.tvm_targets import find_toolchain

        with torch.no_grad():
            program = torch.export.export(module, inputs, strict=False)
        mod = from_exported_program(program, unwrap_unit_return_tuple=True)
        if (self.precision or self.spec.default_precision) == "fp16":
            mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        with tvm.transform.PassContext(opt_level=3):
            executable = tvm.compile(mod, target=self._target())
        path = self.workdir / (re.sub(r"[^A-Za-z0-9_.-]", "_", label) + ".so")
        if self.spec.aarch64:
            from tvm.support import cc

            fcompile = cc.cross_compiler(find_toolchain().compiler)
            executable.export_library(str(path), fcompile=fcompile)
        else:
            executable.export_library(str(path))
        return path

    def prepare(self, label: str, module: nn.Module,
                inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Build ``module`` for the target, upload it, and return a runner that times one
        call on the remote device with ``time_evaluator`` (ms)."""
        import tvm
        from tvm import relax

        path = self._build(label, module, inputs)
        self.session.upload(str(path), target=path.name)
        vm = relax.VirtualMachine(self.session.load_module(path.name), self.device)
        args = [tvm.runtime.tensor(t.detach().cpu().numpy(), self.device) for t in inputs]
        evaluator = vm.time_evaluator("main", self.device, number=1, repeat=1)

        def run() -> float:
            return float(evaluator(*args).results[0]) * 1e3

        return run
