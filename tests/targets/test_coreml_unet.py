"""`snapc compile tiny --target coreml` end to end (and SD-1.5, slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("coremltools")

from snapc.compiler import CompileOptions, compile_model  # noqa: E402
from snapc.graph import Graph  # noqa: E402
from snapc.manifest import Manifest  # noqa: E402
from snapc.passes import Quantize  # noqa: E402
from snapc.pipeline import PassContext  # noqa: E402
from snapc.targets import TARGETS, TargetEntry  # noqa: E402
from snapc.targets.coreml import CoreMLOptions, export  # noqa: E402


@pytest.fixture(autouse=True)
def coreml_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    if "coreml" not in TARGETS:  # until targets/__init__.py registers it
        monkeypatch.setitem(TARGETS, "coreml", TargetEntry(
            "coreml", "snapc.targets.coreml", "CoreMLOptions", "Core ML mlprogram (ANE)"))


def _compile(model: str, out: Path, **target_options: object) -> Manifest:
    result = compile_model(CompileOptions(model=model, target="coreml", out=out,
                                          target_options=target_options))
    return result.manifest


def test_tiny_compiles_to_a_verified_mlpackage(tmp_path: Path) -> None:
    manifest = _compile("tiny", tmp_path / "out", attention="original")
    assert (tmp_path / "out" / "UNet.mlpackage").is_dir()
    assert Manifest.read(tmp_path / "out").verification["passed"]
    assert manifest.verification["psnr_db"] >= 35.0
    assert manifest.extra["ane_report"]["clean"]


def test_tiny_with_ane_attention_layout(tmp_path: Path) -> None:
    # the target's default path (what `snapc compile tiny --target coreml` runs): ~1 min
    manifest = _compile("tiny", tmp_path / "ane")
    assert manifest.verification["passed"] and manifest.verification["psnr_db"] >= 35.0
    assert any(p["name"] == "ane_attention_layout" for p in manifest.extra["target_passes"])
    assert manifest.extra["ane_report"]["clean"]
    assert manifest.extra["timings"]["legalize_s"] > 0


@pytest.mark.slow
def test_sd15_chunked_and_palette6(tmp_path: Path) -> None:
    chunked = _compile("sd15", tmp_path / "fp16", attention="original")
    assert len(chunked.extra["chunks"]) == 2
    assert all(c["weight_bytes"] < 1e9 for c in chunked.extra["chunks"])
    assert chunked.verification["chain_check"]["equal"]
    palette6 = _compile("sd15", tmp_path / "p6", attention="original", palettize=6)
    assert palette6.verification["passed"] and not palette6.extra["chunks"]


def test_tiny_realises_quantization_records(tmp_path: Path, tiny_graph: Graph) -> None:
    graph = Quantize("palette4", min_elements=20_000).run(tiny_graph, PassContext()).graph
    manifest = export(graph, tmp_path, CoreMLOptions(attention="original"))
    assert len(graph.quant) > 10 and manifest.quantization["counts"] == {
        "palette4": len(graph.quant)}
    assert manifest.quantization["realised"]["realised"] == {"palette4": len(graph.quant)}
    assert manifest.extra["quantization"]["compressed_ops"] == {
        "constexpr_lut_to_dense": len(graph.quant)}
    ver = manifest.verification
    assert "fake-quantized" in ver["reference"] and ver["psnr_db"] >= 35.0
    assert ver["vs_fp32"]["psnr_db"] < ver["psnr_db"] - 10  # 4-bit weights: really quantized
    assert manifest.extra["weight_bytes"] < 0.6 * tiny_graph.param_bytes() / 2  # fp16 is /2
