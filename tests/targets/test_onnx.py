"""ONNX target: export, onnxsim, onnxruntime numerics and the manifest."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from snapc.artifacts import atomic_output_dir
from snapc.calibration import calibration_inputs
from snapc.errors import VerificationError
from snapc.manifest import Manifest
from snapc.passes import Quantize, RemoveBlocks
from snapc.pipeline import PassContext
from snapc.targets import get_target
from snapc.targets import onnx as onnx_target
from snapc.targets.onnx import OnnxOptions, export


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory, tiny_graph):
    """Return the folder of tiny's fp32 ONNX artifact and its manifest (exported once)."""
    folder = tmp_path_factory.mktemp("fp32")
    manifest = export(tiny_graph, folder, OnnxOptions())
    manifest.write(folder)
    return folder, manifest


def test_tiny_fp32_verifies_at_60_db(fp32_artifact):
    tmp_path, manifest = fp32_artifact
    assert manifest.verification["passed"] and manifest.verification["psnr_db"] >= 60
    assert manifest.quantization == {} and "vs_fp32" not in manifest.verification
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


@pytest.fixture
def reuse_fp32_export(fp32_artifact, monkeypatch):
    """Make export() copy tiny's fp32 ONNX instead of exporting again: Quantize leaves the
    program unchanged, so the model before the QDQ rewrite is the same (12 s saved a test)."""
    cached = fp32_artifact[0] / "model.onnx"
    monkeypatch.setattr(onnx_target, "_export_onnx",
                        lambda graph, path, options, log: shutil.copy(cached, path))


def test_quantized_graph_is_qdq_checked_against_fake_quant(tmp_path, tiny_graph,
                                                           reuse_fp32_export):
    graph = Quantize("palette4").run(tiny_graph, PassContext()).graph
    out = tmp_path / "artifact"
    with atomic_output_dir(out) as tmp:
        manifest = export(graph, tmp, OnnxOptions())
        manifest.write(tmp)
    ver = manifest.verification
    # palette4 is ~30 dB from fp32: passing the 60 dB gate means the reference is fake-quant
    assert "fake-quantized" in ver["reference"] and ver["min_psnr_db"] == 60.0
    assert ver["psnr_db"] >= 60 and ver["vs_fp32"]["psnr_db"] < 45
    realised = manifest.quantization["realised"]
    assert realised["realised"]["palette4"] > 40
    assert realised["model_bytes"] < 0.3 * tiny_graph.param_bytes()
    assert manifest.quantization["counts"] == {"palette4": len(graph.quant)}
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"Gather", "Mod"} <= ops  # the look-up table is unpacked in the graph
    assert Manifest.read(out).quantization["realised"] == json.loads(json.dumps(realised))


def test_w8a8_gate_and_failure_name_the_fake_quant_reference(tmp_path, tiny_graph,
                                                             reuse_fp32_export):
    graph = Quantize("w8a8", inputs=calibration_inputs(tiny_graph, 1)).run(
        tiny_graph, PassContext()).graph
    with pytest.raises(VerificationError, match=r"< 45.0 dB vs the fake-quantized PyTorch"):
        export(graph, tmp_path, OnnxOptions(min_psnr_db_w8a8=45.0))
