"""`snapc profile`: block isolation, timing backends, the table, the chart and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from torch.fx import Interpreter
from typer.testing import CliRunner

from snapc.cli_profile import profile_command
from snapc.cost import CostModel, LatencyTable
from snapc.errors import SnapcError, ToolMissingError, UnknownNameError
from snapc.profile import ProfileOptions, profile_graph
from snapc.profile_blocks import isolate_blocks

SMALL = ("down_blocks.1.resnets.0", "mid_block.attentions.0")


def _values(graph) -> dict[str, torch.Tensor]:
    """Run the unlifted program and keep every node's value."""
    values: dict[str, torch.Tensor] = {}

    class Capture(Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            values[node.name] = result
            return result

    with torch.no_grad():
        Capture(graph.module()).run(*graph.example_inputs)
    return values


def test_isolated_blocks_compute_what_they_compute_in_the_model(tiny_graph):
    values = _values(tiny_graph)
    for item in isolate_blocks(tiny_graph, list(SMALL)):
        block = tiny_graph.blocks[item.name]
        assert [tuple(t.shape) for t in item.inputs] == list(block.input_shapes)
        with torch.no_grad():
            alone = item.module(*(values[name] for name in block.entry))
        torch.testing.assert_close(alone, values[block.exit], rtol=0, atol=0)
    assert len(isolate_blocks(tiny_graph)) == len(tiny_graph.blocks)


def test_profile_torch_writes_a_table_the_cost_model_uses(tiny_graph, tmp_path):
    options = ProfileOptions(repeats=3, warmup=1, blocks=SMALL, threads=1)
    seen = []
    table = profile_graph(tiny_graph, options, lambda label, done, total: seen.append(done))
    assert [b.name for b in table.blocks] == list(SMALL)
    assert all(len(b.timing.samples_ms) == 3 and b.timing.median_ms > 0 for b in table.blocks)
    assert all(b.timing.p10_ms <= b.timing.median_ms <= b.timing.p90_ms for b in table.blocks)
    assert table.whole_model is not None and table.device == "local-cpu"
    assert table.non_block_ms() == pytest.approx(table.whole_model.median_ms
                                                 - table.sum_blocks_ms())
    assert table.meta["threads"] == 1 and seen == sorted(seen) and seen[-1] == 3 * 4
    again = LatencyTable.read(table.write(tmp_path / "table.json"))
    model = CostModel("local-cpu", table=again)
    estimate = model.estimate_graph(tiny_graph)
    assert estimate.per_block["mid_block.attentions.0"].source == "measured"
    assert estimate.per_block["up_blocks.0.resnets.0"].source == "fitted"
    assert estimate.non_block_source == "measured"


class _CountingTimer:
    """A timer whose calls all take 0.5 ms of (pretend) time, counting how often it is run."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def prepare(self, label, module, inputs):
        self.calls[label] = 0

        def run() -> float:
            self.calls[label] += 1
            return 0.5

        return run


def test_short_samples_average_back_to_back_calls(tiny_graph):
    timer = _CountingTimer()
    options = ProfileOptions(blocks=SMALL[:1], repeats=3, warmup=1, min_sample_ms=5.0)
    table = profile_graph(tiny_graph, options, timer=timer)
    # warm-up 1 + one sizing call + 3 samples of ceil(5 / 0.5) = 10 calls each
    assert timer.calls[SMALL[0]] == 1 + 1 + 3 * 10
    assert table.blocks[0].timing.median_ms == 0.5
    once = _CountingTimer()
    profile_graph(tiny_graph, ProfileOptions(blocks=SMALL[:1], repeats=3, warmup=1),
                  timer=once)
    assert once.calls[SMALL[0]] == 1 + 3


def test_cuda_graphs_need_torch_on_cuda(tiny_graph):
    with pytest.raises(SnapcError, match="--cuda-graphs times CUDA graph replays"):
        profile_graph(tiny_graph, ProfileOptions(cuda_graphs=True, blocks=SMALL[:1]))
    with pytest.raises(SnapcError, match="--cuda-graphs needs --backend torch"):
        profile_graph(tiny_graph, ProfileOptions(backend="onnxruntime", device="cuda",
                                                 cuda_graphs=True))


def test_a_block_that_cannot_be_captured_is_a_one_line_error(monkeypatch):
    import snapc.profile_backends as backends

    def refuse(call, min_sample_ms=0.0):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(backends, "graph_replays", refuse)
    timer = backends.TorchTimer.__new__(backends.TorchTimer)  # no GPU here: skip the checks
    timer.device, timer.clock = torch.device("cpu"), time.perf_counter
    timer.cuda_graphs, timer.min_sample_ms = True, 5.0
    with pytest.raises(SnapcError, match=r"^mid_block.attentions.0 cannot be captured as a CUDA "
                       r"graph \(operation not permitted when stream is capturing\); profile "
                       r"it without --cuda-graphs$"):
        timer.prepare("mid_block.attentions.0", torch.nn.Identity(), (torch.ones(1),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_samples_are_gpu_time_of_replays():
    from snapc.compiler import load_graph

    graph = load_graph("tiny", device="cuda")
    eager = profile_graph(graph, ProfileOptions(device="cuda", repeats=5, blocks=SMALL,
                                                min_sample_ms=2.0))
    graphed = profile_graph(graph, ProfileOptions(device="cuda", repeats=5, blocks=SMALL,
                                                  min_sample_ms=2.0, cuda_graphs=True))
    assert graphed.meta["clock"] == "cuda-events" and graphed.meta["cuda_graphs"]
    for fast, slow in zip(graphed.blocks, eager.blocks, strict=True):
        # tiny blocks are launch-bound: eager pays Python dispatch per op, replays do not
        assert 0 < fast.timing.median_ms < slow.timing.median_ms
    assert 0 < graphed.whole_model.median_ms < eager.whole_model.median_ms


def test_profile_onnxruntime_times_the_exported_block(tiny_graph):
    options = ProfileOptions(backend="onnxruntime", repeats=2, warmup=1, blocks=SMALL[:1],
                             whole_model=False)
    table = profile_graph(tiny_graph, options)
    assert table.backend == "onnxruntime" and table.blocks[0].timing.median_ms > 0
    assert table.whole_model is None and table.non_block_ms() is None


def test_unknown_backend_lists_the_valid_ones(tiny_graph):
    with pytest.raises(UnknownNameError, match="unknown backend 'tflite'.*onnxruntime"):
        profile_graph(tiny_graph, ProfileOptions(backend="tflite"))


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS Core ML really runs")
def test_coreml_backend_says_it_needs_macos(tiny_graph):
    with pytest.raises(ToolMissingError, match="needs macOS"):
        profile_graph(tiny_graph, ProfileOptions(backend="coreml", blocks=SMALL[:1]))


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("profile")(profile_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


def test_profile_cli_writes_table_and_chart(tmp_path):
    out = tmp_path / "tiny.json"
    result = CliRunner().invoke(_app(), ["profile", "tiny", "-o", str(out), "--repeats", "2",
                                         "--warmup", "0", "--block", SMALL[0], "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == "snapc-latency-table/1" and len(data["blocks"]) == 1
    assert data["whole_model"]["median_ms"] > 0 and "non_block_ms" in data
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "non-block cost" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rpc_host_that_does_not_answer_fails_with_exit_2(tmp_path):
    silent = socket.socket()  # accepts TCP (kernel backlog) but never speaks TVM RPC
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    port = silent.getsockname()[1]
    try:
        start = time.perf_counter()
        result = CliRunner().invoke(_app(), [
            "profile", "tiny", "--backend", "tvm", "--rpc", f"127.0.0.1:{port}",
            "--target", "x86", "--rpc-timeout", "1.5", "-o", str(tmp_path / "t.json")])
        assert time.perf_counter() - start < 30
    finally:
        silent.close()
    if "apache-tvm" in result.output:
        pytest.skip("TVM is not installed")
    assert result.exit_code == 2, result.output
    assert "no TVM RPC handshake came within 1.5 s" in result.output
    closed = _free_port()
    result = CliRunner().invoke(_app(), ["profile", "tiny", "--backend", "tvm", "--rpc",
                                         f"127.0.0.1:{closed}", "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "cannot reach TVM RPC server" in result.output
    result = CliRunner().invoke(_app(), ["profile", "tiny", "--backend", "tvm", "--rpc",
                                         "nonsense", "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


@pytest.fixture()
def rpc_server(tmp_path):
    """A real TVM RPC server on 127.0.0.1 (stopped with SIGINT: SIGTERM leaves a worker)."""
    pytest.importorskip("tvm", reason="TVM is not installed")
    pytest.importorskip("cloudpickle", reason="the TVM RPC server needs cloudpickle")
    port = _free_port()
    log = open(tmp_path / "rpc.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              start_new_session=True)  # its own group: workers stop with it
    deadline = time.time() + 240  # importing tvm takes a while on a loaded machine
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"TVM RPC server did not start: {Path(log.name).read_text()[-500:]}")
    yield f"127.0.0.1:{port}"
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    with contextlib.suppress(ProcessLookupError):  # the popen worker outlives the server
        os.killpg(server.pid, signal.SIGKILL)
    log.close()


def test_tvm_rpc_times_a_block_on_the_remote_server(tiny_graph, rpc_server):
    options = ProfileOptions(backend="tvm", rpc=rpc_server, target="x86", repeats=3,
                             warmup=1, blocks=SMALL[:1], whole_model=False)
    table = profile_graph(tiny_graph, options)
    assert table.device == "tvm-x86" and table.backend == "tvm"
    timing = table.blocks[0].timing
    assert len(timing.samples_ms) == 3 and all(s > 0 for s in timing.samples_ms)
