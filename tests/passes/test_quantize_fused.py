"""Quantize after the fusions: packed and folded weights are quantized, exported and counted."""

from __future__ import annotations

import json

import pytest

from snapc.compiler import CompileOptions, compile_model
from snapc.passes import Quantize, fusion_passes
from snapc.passes.quantize import quant_records
from snapc.pipeline import PassContext, Pipeline
from snapc.targets.onnx import OnnxOptions, export

PACKED = "snapc_packed_weight"


@pytest.fixture(scope="module")
def fused(tiny_graph):
    """Return tiny after every fusion (the onnx target lowers none of them)."""
    return Pipeline(fusion_passes("all")).run(tiny_graph, PassContext()).graph


def test_new_weights_stay_under_the_model_root(fused, tiny_graph):
    state = fused.program.state_dict
    added = [k for k in state if "snapc_" in k]
    assert any(PACKED in k for k in added)
    assert all(k.startswith(f"{fused.root}.") for k in state)
    # packed q/k/v live in their attention module, so its block keeps its parameters
    assert all(".attn" in k.rsplit(".", 1)[0] for k in added if PACKED in k)
    before = {n: b.params for n, b in tiny_graph.blocks.blocks.items()}
    assert {n: b.params for n, b in fused.blocks.blocks.items()} == before
    uncovered = [m for m in fused.blocks.uncovered if not m.startswith("snapc_folded")]
    assert uncovered == list(tiny_graph.blocks.uncovered)  # folded constants of no weight aside


@pytest.mark.parametrize("scheme", ["w8", "w8a8", "fp16"])
def test_quantize_after_fusions_exports_and_counts_packed_weights(tmp_path, fused, scheme):
    result = Quantize(scheme, calibration=1).run(fused, PassContext())
    records = quant_records(result)
    state = fused.program.state_dict
    assert all(f"{fused.root}.{k}" in state for k in records if not k.startswith("node:"))
    packed = [k for k in records if PACKED in k]
    assert len(packed) == sum(PACKED in k for k in state)  # every packed projection quantized
    assert {records[k]["scheme"] for k in packed} == {scheme}
    manifest = export(result.graph, tmp_path, OnnxOptions())
    assert manifest.verification["passed"]
    realised = manifest.quantization["realised"]
    weights = [k for k, r in records.items() if not k.startswith("node:") and r["scheme"] != "fp32"]
    assert sum(realised["realised"].values()) + len(realised["unmatched"]) == len(weights)
    layers = set(packed) | {k for k in records if records[k].get("bits", 16) <= 8}
    assert not layers & set(realised["unmatched"])  # every conv/linear weight is realised
    if scheme != "fp16":  # fp16 also records biases/norm affines, some folded by the exporter
        assert realised["unmatched"] == []


def test_compile_with_fusions_and_w8_writes_sensible_manifest(tmp_path):
    out = tmp_path / "tiny-w8"
    compile_model(CompileOptions(model="tiny", target="onnx", out=out, fusions="all",
                                 quantize={"scheme": "w8"}))
    manifest = json.loads((out / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert manifest["verification"]["passed"]
    assert quant["scheme"] == "w8"
    assert quant["counts"] == {"w8": len(quant["layers"])} == quant["realised"]["realised"]
    assert quant["realised"]["unmatched"] == []
    packed = [k for k in quant["layers"] if PACKED in k]
    assert len(packed) == 12  # 6 self-attention qkv + 6 cross-attention kv packs
    assert all(quant["layers"][k]["scheme"] == "w8" for k in packed)
    names = [p["name"] for p in manifest["passes"]]
    assert names[-1] == "quantize" and "pack_qkv" in names and "pack_kv" in names
