"""`snapc compile tiny --target coreml` end to end (and SD-1.5, slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("coremltools")

from snapc.compiler import CompileOptions, compile_model  # noqa: E402
from snapc.manifest import Manifest  # noqa: E402
from snapc.targets import TARGETS, TargetEntry  # noqa: E402


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


@pytest.mark.slow
def test_tiny_with_ane_attention_layout(tmp_path: Path) -> None:
    manifest = _compile("tiny", tmp_path / "ane")
    assert manifest.verification["passed"]
    assert any(p["name"] == "ane_attention_layout" for p in manifest.extra["target_passes"])


@pytest.mark.slow
def test_sd15_chunked_and_palette6(tmp_path: Path) -> None:
    chunked = _compile("sd15", tmp_path / "fp16", attention="original")
    assert len(chunked.extra["chunks"]) == 2
    assert all(c["weight_bytes"] < 1e9 for c in chunked.extra["chunks"])
    assert chunked.verification["chain_check"]["equal"]
    palette6 = _compile("sd15", tmp_path / "p6", attention="original", palettize=6)
    assert palette6.verification["passed"] and not palette6.extra["chunks"]
