"""snapc tune: MetaSchedule records written by a tiny search, applied by a compile that still
verifies against PyTorch; measuring through a TVM RPC tracker with two local servers; bad
records, targets and options are one-line errors (exit 2) before any long work.

The model is a two-layer conv net (a handful of kernels) and the searches are a few trials, so
each child process is dominated by importing TVM and torch.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

tvm = pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'snapc[tvm]'")
pytest.importorskip("psutil", reason="MetaSchedule needs psutil: pip install 'snapc[tvm]'")

from snapc.cli import app  # noqa: E402
from snapc.errors import SnapcError  # noqa: E402
from snapc.frontend import trace  # noqa: E402
from snapc.graph import Graph, ModelInfo  # noqa: E402
from snapc.targets.tvm import TvmOptions, export  # noqa: E402
from snapc.targets.tvm_tuning import INDEX, TUNING_RECORDS, WORKLOADS, read_index  # noqa: E402
from snapc.testing import one_error_line  # noqa: E402
from snapc.tune import TuneOptions, tune_graph  # noqa: E402


class _Tiny(nn.Module):
    """sample, timestep, encoder_hidden_states -> sample: conv, SiLU, conv, plus a text bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)
        self.text = nn.Linear(16, 8)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        bias = self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        hidden = nn.functional.silu(self.conv_in(sample) + bias + timestep[:, None, None, None])
        return self.conv_out(hidden)


@pytest.fixture(scope="module")
def graph() -> Graph:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.full((1,), 0.5),
              torch.randn(1, 3, 16, generator=gen))
    return trace(_Tiny().eval(), inputs, ModelInfo(name="tiny-conv", random_weights=True))


@pytest.fixture(scope="module")
def records(graph: Graph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "records"
    result = tune_graph(graph, TuneOptions(model="tiny-conv", target="x86", out=out, trials=4,
                                           trials_per_iter=4))
    assert result.index["records"] >= 1, result.summary
    return out


def test_a_tiny_search_writes_records_keyed_by_target_and_device(records: Path) -> None:
    index = read_index(records)
    assert index["target"] == "x86" and index["device"] == "local"
    assert index["tvm_target"]["kind"] == "llvm" and index["tvm_target"]["num-cores"] >= 1
    assert index["workloads"] >= 1 and index["records"] >= 1
    assert all(v["best_us"] > 0 for v in index["kernels"].values()) and index["kernels"]
    lines = (records / TUNING_RECORDS).read_text().splitlines()
    assert len(lines) == index["records"] and all(json.loads(ln) for ln in lines)


def test_compile_applies_the_records_and_still_verifies(graph: Graph, records: Path,
                                                        tmp_path: Path) -> None:
    manifest = export(graph, tmp_path, TvmOptions(target="x86", tuning=str(records)))
    info = manifest.extra["tvm"]
    assert "MetaScheduleApplyDatabase" in info["relax_passes"]
    assert info["tuning"]["applied_kernels"]["tuned"] >= 1
    assert manifest.verification["passed"] and manifest.verification["psnr_db"] >= 60
    (tmp_path / "untuned").mkdir()
    untuned = export(graph, tmp_path / "untuned", TvmOptions(target="x86"))
    assert untuned.extra["tvm"]["relax_passes"].count("MetaScheduleApplyDatabase") == 0


def test_a_second_model_reuses_the_kernels_already_tuned(graph: Graph, records: Path) -> None:
    from tvm.s_tir import meta_schedule as ms

    from snapc.targets.tvm_build import import_graph, lower
    from snapc.targets.tvm_tune import _heaviest, _tuned
    from snapc.targets.tvm_tuning import open_database

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    module = lower(import_graph(graph.program).module, target, stop_at_tuning=True).module
    tasks = ms.relax_integration.extract_tasks(module, target)
    database = open_database(records)
    reused = [t for t in tasks if _tuned(database, t)]
    assert len(reused) == len(read_index(records)["kernels"]) >= 1
    assert len(reused) < len(tasks)  # 4 trials measure one kernel; the rest are still to tune
    heaviest = _heaviest(tasks, 2)
    assert len(heaviest) == 2 and all("conv2d" in t.task_name for t in heaviest)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture()
def tracker() -> Iterator[tuple[int, str]]:
    """A TVM RPC tracker and two RPC servers registered under one key, on this machine."""
    pytest.importorskip("cloudpickle", reason="TVM's RPC server needs cloudpickle")
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    port, key = _free_port(), "snapc-test-x86"
    started = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                                 "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for(port)
        for _ in range(2):
            server_port = _free_port()
            started.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                 str(server_port), "--port-end", str(server_port + 1), "--tracker",
                 f"127.0.0.1:{port}", "--key", key],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_until_registered(port, key, 2)
        yield port, key
    finally:
        for proc in reversed(started):
            proc.send_signal(signal.SIGINT)  # SIGTERM would leave a server's worker behind
        for proc in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_until_registered(port: int, key: str, count: int) -> None:
    from tvm import rpc

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        summary = rpc.connect_tracker("127.0.0.1", port).summary()
        free = summary.get("queue_info", {}).get(key, {}).get("free", 0)
        if free >= count:
            return
        time.sleep(1)
    raise AssertionError(f"{count} RPC servers did not register under {key}")


def test_tuning_measures_through_an_rpc_tracker_with_two_servers(
        graph: Graph, tracker: tuple[int, str], tmp_path: Path) -> None:
    port, key = tracker
    out = tmp_path / "records"
    result = tune_graph(graph, TuneOptions(model="tiny-conv", target="x86", out=out, trials=2,
                                           trials_per_iter=2, rpc=f"127.0.0.1:{port}",
                                           device_key=key, rpc_workers=2))
    assert result.index["device"] == key and result.index["records"] >= 1
    assert any(t["best_us"] for t in result.summary["tasks"])
    with pytest.raises(SnapcError, match="were measured on device 'snapc-test-x86', not"):
        tune_graph(graph, TuneOptions(model="tiny-conv", target="x86", out=out, trials=1))


def _compile(*args: str) -> object:
    return CliRunner().invoke(app, ["compile", "tiny", "--target", *args])


def test_missing_records_are_one_line_errors(tmp_path: Path) -> None:
    line = one_error_line(_compile("x86", "-o", str(tmp_path / "a"), "--tuning",
                                   str(tmp_path / "none")))
    assert "do not exist" in line and "snapc tune" in line


def test_corrupt_records_are_one_line_errors(records: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (INDEX, WORKLOADS):
        (bad / name).write_text((records / name).read_text())
    (bad / TUNING_RECORDS).write_text("[0, {\"trace\": \n")
    line = one_error_line(_compile("x86", "-o", str(tmp_path / "a"), "--tuning", str(bad)))
    assert "corrupt tuning records" in line and TUNING_RECORDS in line


def test_records_for_another_target_are_one_line_errors(records: Path, tmp_path: Path) -> None:
    line = one_error_line(_compile("x86", "-o", str(tmp_path / "a"), "--tuning", str(records),
                                   "--mcpu", "skylake-avx512"))
    assert "are for target x86" in line and "mcpu=skylake-avx512" in line
    line = one_error_line(_compile("onnx", "-o", str(tmp_path / "b"), "--tuning",
                                   str(records)))
    assert "only to the TVM targets" in line


@pytest.mark.parametrize(("target", "library", "says"), [
    ("x86", "cublas", "serves target cuda, not x86"),
    ("x86", "dnnl", "no Relax dnnl partitioning"),
    ("cuda", "cublas", "built without cublas (USE_CUBLAS=OFF"),
    ("x86", "mkl", "unknown offload library 'mkl'"),
])
def test_offload_the_wheel_cannot_build_is_a_one_line_error(
        target: str, library: str, says: str, tmp_path: Path) -> None:
    line = one_error_line(_compile(target, "-o", str(tmp_path / "a"), "--offload", library))
    assert says in line


def test_bad_tune_requests_are_one_line_errors(tmp_path: Path) -> None:
    def tune(*args: str) -> str:
        return one_error_line(CliRunner().invoke(app, ["tune", "tiny", *args]))

    assert "go together" in tune("--target", "x86", "-o", str(tmp_path / "r"), "--rpc", "h:1")
    assert "unknown TVM target 'onnx'" in tune("--target", "onnx", "-o", str(tmp_path / "r"))
    assert "through a TVM RPC tracker" in tune("--target", "cuda", "-o", str(tmp_path / "r"))
    assert "does not exist" in tune("--target", "x86", "-o", str(tmp_path / "no" / "r"))
    assert "at least 1" in tune("--target", "x86", "-o", str(tmp_path / "r"), "--max-kernels", "0")
    assert "build workers must be at least 1" in tune("--target", "x86", "-o",
                                                      str(tmp_path / "r"), "--build-workers", "0")
