"""QDQ ONNX: quantized artifacts run in onnxruntime, shrink, and match the fake-quant graph."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from snapc.calibration import calibration_inputs
from snapc.frontend import trace
from snapc.numerics import compare
from snapc.passes.quantize import Quantize, apply_records_to_module, quant_records
from snapc.passes.quantize_schemes import make_record
from snapc.pipeline import PassContext
from snapc.targets.onnx import OnnxOptions, export
from snapc.targets.onnx_qdq import apply_qdq, int8_kernels


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, tiny_graph):
    out = tmp_path_factory.mktemp("fp32")
    export(tiny_graph, out, OnnxOptions(separate_weights=True))  # as a quantized export does
    return out / "model.onnx"


def _ort(path, graph):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(graph.input_names, graph.example_inputs, strict=True)}
    return session.run(None, feeds)[0]


@pytest.mark.parametrize(("scheme", "min_psnr", "max_ratio"), [
    ("w8", 60, 0.34), ("w4", 60, 0.24), ("palette6", 60, 0.30),
    ("fp16", 60, 0.55), ("w8a8", 30, 0.36)])
def test_qdq_runs_in_onnxruntime_and_matches_fake_quant(tmp_path, fp32_onnx, tiny_graph, scheme,
                                                        min_psnr, max_ratio):
    path = tmp_path / "model.onnx"
    shutil.copy(fp32_onnx, path)
    inputs = calibration_inputs(tiny_graph, 2) if scheme in ("w8a8", "fp16") else None
    records = quant_records(Quantize(scheme, inputs=inputs).run(tiny_graph, PassContext()))
    if scheme == "fp16":  # weights only in ONNX: compare with fp16 weights, fp32 compute
        records = {k: v for k, v in records.items() if not k.startswith("node:")}
    info = apply_qdq(path, tiny_graph, records)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    used = {name for node in model.graph.node for name in node.input}
    assert [i.name for i in model.graph.initializer if i.name not in used] == []  # w8a8 biases
    # every conv/linear weight is found (onnxsim's q/k/v packing is off for quantized
    # exports); only LayerNorm/GroupNorm constants the exporter folds stay fp32 (fp16 records)
    assert all(".norm" in k for k in info["unmatched"])
    assert scheme == "fp16" or info["unmatched"] == []
    assert len(info["realised"]) == 1
    assert sum(info["realised"].values()) > 40
    records = {k: v for k, v in records.items() if k not in info["unmatched"]}
    assert info["model_bytes"] < max_ratio * fp32_onnx.stat().st_size
    out = _ort(path, tiny_graph)
    # fp16 in ONNX stores the weights in fp16 and computes in fp32: compare weights only
    reference = apply_records_to_module(tiny_graph, records, activations=scheme != "fp16").run()
    assert compare(reference, out).psnr_db >= min_psnr
    assert compare(tiny_graph.run(), out).psnr_db < 150  # it really is quantized
    if scheme == "w8a8":
        kernels = int8_kernels(path)
        assert kernels.get("QLinearConv", 0) > 30 and kernels.get("MatMulIntegerToFloat", 0) > 0
        assert not np.isnan(out).any()



class _TwoLinear(torch.nn.Module):
    """A square and a non-square Linear: the exporter stores both transposed for MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.square = torch.nn.Linear(64, 64)
        self.wide = torch.nn.Linear(64, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.relu(self.square(x)))


def test_fp16_realises_transposed_matmul_weights(tmp_path):
    torch.manual_seed(0)
    graph = trace(_TwoLinear().eval(), (torch.randn(2, 5, 64),))
    export(graph, tmp_path, OnnxOptions())
    path = tmp_path / "model.onnx"
    records = {k: make_record(t, "fp16") for k, t in
               ((n.removeprefix("net."), t) for n, t in graph.program.state_dict.items())}
    info = apply_qdq(path, graph, records)
    assert info["realised"] == {"fp16": 4} and info["unmatched"] == []
    out = _ort(path, graph)  # before the fix: the wide MatMul's shapes did not match
    reference = apply_records_to_module(graph, records, activations=False).run()
    assert compare(reference, out).psnr_db >= 100  # the square weight is not used transposed
