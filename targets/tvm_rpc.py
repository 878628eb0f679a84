"""Upload a TVM artifact folder to a device through TVM RPC, run it and time it.

This file is standalone on purpose (it imports only tvm, numpy and safetensors): the TVM
target copies it into every artifact folder as ``run_on_device.py``, and
``snapc profile --backend tvm`` calls ``profile`` from here.

On the phone run TVM's RPC server (``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090``
on aarch64 Linux, or the TVM RPC Android app), then from the machine holding the folder::

    python run_on_device.py HOST:PORT [--repeat 10]

A local server for the x86 target needs ``cloudpickle``; stop it with SIGINT (SIGTERM leaves a
worker process behind).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DeviceTiming", "profile", "main"]

LIBRARY = "model.so"
PARAMS = "params.safetensors"


@dataclass(frozen=True)
class DeviceTiming:
    """Latency of one call of the entry function on the remote device, in milliseconds."""

    device: str
    target: str
    mean_ms: float
    median_ms: float
    std_ms: float
    repeat: int
    upload_s: float
    output_shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def _remote_device(session: Any, kind: str) -> Any:
    return {"opencl": session.cl, "cuda": session.cuda, "cpu": session.cpu}[kind](0)


def _inputs(manifest: dict[str, Any], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in manifest["inputs"]:
        value = rng.standard_normal(spec["shape"]) if spec["name"] != "timestep" else \
            np.full(spec["shape"], 500)
        arrays.append(value.astype(spec["dtype"]))
    return arrays


def profile(folder: str | Path, rpc: str, repeat: int = 10, seed: int = 0) -> DeviceTiming:
    """Upload ``folder``'s model.so and weights to the RPC server at ``rpc`` ("HOST:PORT"),
    run the entry function once, then time ``repeat`` calls; return the timing."""
    import tvm
    from safetensors.numpy import load_file
    from tvm import rpc as tvm_rpc
    from tvm.runtime.vm import VirtualMachine

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    info = manifest["extra"]["tvm"]
    host, _, port = rpc.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rpc must be HOST:PORT, got '{rpc}'")
    start = time.perf_counter()
    session = tvm_rpc.connect(host, int(port))
    session.upload(str(folder / LIBRARY))
    device = _remote_device(session, info["device"])
    vm = VirtualMachine(session.load_module(LIBRARY), device)
    weights = load_file(str(folder / PARAMS))
    args = [tvm.runtime.tensor(a, device) for a in _inputs(manifest, seed)]
    args += [tvm.runtime.tensor(weights[name], device) for name in info["param_order"]]
    upload_s = time.perf_counter() - start
    entry = info["entry"]
    vm.set_input(entry, *args)
    vm.invoke_stateful(entry)
    output = vm.get_outputs(entry)
    timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=repeat)
    seconds = np.array(timer(entry).results) * 1000.0
    return DeviceTiming(
        device=str(device), target=manifest["target"], mean_ms=float(seconds.mean()),
        median_ms=float(np.median(seconds)), std_ms=float(seconds.std()), repeat=repeat,
        upload_s=upload_s, output_shape=tuple(int(d) for d in output.shape))


def main(argv: list[str] | None = None) -> None:
    """Parse ``HOST:PORT [--repeat N]``, profile the folder holding this script, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rpc", help="RPC server address, HOST:PORT")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--folder", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    print(json.dumps(profile(args.folder, args.rpc, args.repeat).to_json(), indent=2))


if __name__ == "__main__":
    main()
