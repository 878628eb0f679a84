"""The compile flow's bookkeeping: the Quantize pass in the pass list and in the manifest."""

from __future__ import annotations

from pathlib import Path

from snapc.compiler import CompileOptions, default_passes, quantization_to_manifest
from snapc.manifest import Manifest


def test_quantize_is_the_last_pass():
    options = CompileOptions(model="tiny", target="onnx", out=Path("x"), remove=("conv_in",),
                             fusions="all", quantize={"scheme": "w8"})
    passes = default_passes(options)
    assert passes[0].name == "remove_blocks" and len(passes) > 3
    assert passes[-1].name == "quantize" and passes[-1].scheme == "w8"
    assert all(p.name != "quantize" for p in default_passes(
        CompileOptions(model="tiny", target="onnx", out=Path("x"))))


def test_mixed_choices_reach_the_manifest_once():
    layers = {"a.weight": {"scheme": "w8", "sensitivity_psnr_db": {"w8": 70.0}}}
    manifest = Manifest("onnx", {}, [], [], {}, quantization={"counts": {"w8": 1}, "layers": {
        "a.weight": {"scheme": "w8", "bits": 8}}}, passes=[
        {"name": "remove_blocks", "params": {}, "info": {}},
        {"name": "quantize", "params": {"scheme": "mixed"}, "info": {
            "records": {"a.weight": {"scheme": "w8", "bits": 8}},
            "mixed": {"size_mb": 1.2, "mean_bits": 8.0, "psnr_db": 70.0, "layers": layers}}}])
    quantization_to_manifest(manifest)
    assert manifest.quantization["scheme"] == "mixed"
    assert manifest.quantization["mixed"]["mean_bits"] == 8.0
    assert "layers" not in manifest.quantization["mixed"]  # per layer: in the pass's info
    assert manifest.passes[1]["info"]["records"] == "see quantization.layers"
    assert manifest.passes[1]["info"]["mixed"]["layers"] == layers
