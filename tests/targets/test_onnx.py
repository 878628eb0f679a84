"""ONNX target: export, onnxsim, onnxruntime numerics and the manifest."""

from __future__ import annotations

import json

import onnx
import pytest

from snapc.artifacts import atomic_output_dir
from snapc.errors import VerificationError
from snapc.passes import RemoveBlocks
from snapc.pipeline import PassContext
from snapc.targets import get_target
from snapc.targets.onnx import OnnxOptions, export


def test_tiny_fp32_verifies_at_60_db(tmp_path, tiny_graph):
    manifest = export(tiny_graph, tmp_path, OnnxOptions())
    manifest.write(tmp_path)
    assert manifest.verification["passed"] and manifest.verification["psnr_db"] >= 60
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["inputs"][0] == {"name": "sample", "shape": [1, 4, 16, 16], "dtype": "float32"}
    assert data["outputs"][0]["shape"] == [1, 4, 16, 16]
    assert data["versions"]["onnxruntime"] and data["versions"]["torch"]
    assert data["extra"]["onnxsim"]["ran"] and data["model"]["random_weights"] is True


def test_removed_blocks_reach_the_artifact(tmp_path, tiny_graph):
    graph = RemoveBlocks(["mid_block.attentions.0"]).run(tiny_graph, PassContext()).graph
    manifest = export(graph, tmp_path, OnnxOptions(simplify=False))
    assert manifest.model["removed_blocks"] == ["mid_block.attentions.0"]
    assert manifest.verification["psnr_db"] >= 60


def test_verification_gate_rejects_and_leaves_nothing(tmp_path, tiny_graph):
    out = tmp_path / "artifact"
    with pytest.raises(VerificationError, match="PSNR"):
        with atomic_output_dir(out) as tmp:
            export(tiny_graph, tmp, OnnxOptions(min_psnr_db=250.0, simplify=False))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_registry_knows_onnx():
    entry = get_target("onnx")
    assert entry.make_options(min_psnr_db=50.0).min_psnr_db == 50.0
