"""Core ML target: export, verification gate, chunked and palettized variants, errors."""

from __future__ import annotations

import builtins
import json
import platform
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("coremltools")

from snapc.errors import SnapcError, ToolMissingError, VerificationError  # noqa: E402
from snapc.frontend import trace  # noqa: E402
from snapc.graph import Graph  # noqa: E402
from snapc.targets.coreml import CoreMLOptions, export  # noqa: E402
from tests.targets.coreml_models import SkipNet  # noqa: E402

FAST = dict(attention="original")  # SkipNet has no attention block to re-layout


@pytest.fixture(scope="module")
def skipnet() -> Graph:
    torch.manual_seed(0)
    return trace(SkipNet(channels=48).eval(), (torch.randn(1, 4, 8, 8),))


def _export(graph: Graph, folder: Path, **options: object):
    folder.mkdir()
    return export(graph, folder, CoreMLOptions(**{**FAST, **options}))


def test_export_writes_a_verified_package(skipnet: Graph, tmp_path: Path) -> None:
    manifest = _export(skipnet, tmp_path / "a")
    files = manifest.files
    assert (tmp_path / "a" / files["model"] / "Manifest.json").is_file()
    ver = manifest.verification
    assert ver["passed"] and ver["psnr_db"] >= 35.0 and ver["min_psnr_db"] == 35.0
    assert "numpy MIL interpreter" in ver["runtime"]
    report = json.loads((tmp_path / "a" / files["ane_report"]).read_text())
    assert report["clean"], report["issues"][:3]
    assert manifest.target_options["deployment_target"] == "iOS17"
    assert manifest.target_options["compute_units"] == "CPU_AND_NE"
    assert manifest.extra["chunks"] == [] and manifest.extra["weight_bytes"] > 0
    assert json.loads(json.dumps(manifest.to_json()))  # JSON-ready


def test_chunked_export_chains_to_the_whole(skipnet: Graph, tmp_path: Path) -> None:
    manifest = _export(skipnet, tmp_path / "c", chunks=2)
    chain = manifest.extra["chunks"]
    assert [c["file"] for c in chain] == ["UNet_chunk1.mlpackage", "UNet_chunk2.mlpackage"]
    assert set(chain[1]["inputs"]) <= set(chain[0]["outputs"]) | {"input_0"}
    assert chain[-1]["outputs"] == ["noise_pred"]
    check = manifest.verification["chain_check"]
    assert check["ran"] and check["equal"] and check["max_abs_diff"] == 0.0


def test_auto_chunking_respects_the_weight_budget(skipnet: Graph, tmp_path: Path) -> None:
    total = _export(skipnet, tmp_path / "w").extra["weight_bytes"]
    manifest = _export(skipnet, tmp_path / "b", max_chunk_bytes=int(total * 0.7))
    assert len(manifest.extra["chunks"]) >= 2
    assert all(c["weight_bytes"] < total * 0.7 for c in manifest.extra["chunks"])


def test_palettized_export_is_verified(skipnet: Graph, tmp_path: Path) -> None:
    manifest = _export(skipnet, tmp_path / "p", palettize=6, min_psnr_db=30.0)
    assert manifest.extra["quantization"]["schemes"] == {"palette6": 2}
    assert manifest.verification["passed"]


def test_failed_verification_raises(skipnet: Graph, tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="artifact not written"):
        _export(skipnet, tmp_path / "v", min_psnr_db=300.0)


def test_torch_export_frontend(skipnet: Graph, tmp_path: Path) -> None:
    assert _export(skipnet, tmp_path / "e", frontend="export").verification["passed"]


def test_missing_coremltools_is_a_clear_error(skipnet: Graph, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_coremltools(name: str, *args: object, **kwargs: object):
        if name == "coremltools" or name.startswith("coremltools."):
            raise ImportError("No module named 'coremltools'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    with pytest.raises(ToolMissingError, match="pip install 'coremltools"):
        export(skipnet, tmp_path, CoreMLOptions())


def test_bad_options_are_rejected(skipnet: Graph, tmp_path: Path) -> None:
    with pytest.raises(SnapcError, match="deployment_target 'iOS12'"):
        export(skipnet, tmp_path, CoreMLOptions(deployment_target="iOS12"))


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the Linux refusal")
def test_coreml_verifier_refuses_off_macos(skipnet: Graph, tmp_path: Path) -> None:
    with pytest.raises(ToolMissingError, match="only on macOS"):
        _export(skipnet, tmp_path / "m", verifier="coreml")


@pytest.mark.skipif(platform.system() != "Darwin",
                    reason="Core ML prediction runs only on macOS; Linux verifies with the "
                           "numpy MIL interpreter (the other tests)")
def test_coreml_prediction_on_macos(skipnet: Graph, tmp_path: Path) -> None:
    manifest = _export(skipnet, tmp_path / "mac", verifier="coreml", chunks=2)
    assert manifest.verification["coreml_prediction"] == "ran"
    assert manifest.verification["passed"]


def test_chain_check_catches_a_chunk_that_differs(skipnet: Graph, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from snapc.targets import coreml

    real = coreml._write_chunks

    def corrupted(*args: object, **kwargs: object):
        chain = real(*args, **kwargs)
        weights = args[1] / chain[-1]["file"] / "Data" / "com.apple.CoreML" / "weights"
        blob = weights / "weight.bin"
        data = np.fromfile(blob, np.uint8)
        data[-64:] ^= 0x40  # flip a bit in the last fp16 weights of the last chunk
        data.tofile(blob)
        return chain

    monkeypatch.setattr(coreml, "_write_chunks", corrupted)
    with pytest.raises(VerificationError, match="chained chunks differ from the whole"):
        _export(skipnet, tmp_path / "x", chunks=2, min_psnr_db=0.0)


def test_chain_check_compares_every_boundary(skipnet: Graph, tmp_path: Path) -> None:
    manifest = _export(skipnet, tmp_path / "b", chunks=3)
    check = manifest.verification["chain_check"]
    outputs = [n for c in manifest.extra["chunks"] for n in c["outputs"]]
    assert check["equal"] and check["boundaries_compared"] == len(outputs) >= 3
    assert manifest.extra["timings"]["chain_check_s"] >= 0


def test_unflattened_module_shares_the_program_tensors(skipnet: Graph) -> None:
    from snapc.targets.coreml import _unflattened

    module = _unflattened(skipnet)
    own = {t.untyped_storage().data_ptr() for t in skipnet.program.state_dict.values()}
    held = [t for m in module.modules() for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None]
    inner = [m.__dict__["graph_module"] for m in module.modules() if "graph_module" in m.__dict__]
    held += [t for g in inner for m in g.modules() for t in m._parameters.values()
             if t is not None]
    assert held and all(t.untyped_storage().data_ptr() in own for t in held)
    assert "unflattened_module" not in skipnet.program.graph_module.meta


def test_fast_overflow_check_matches_coremltools() -> None:
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from snapc.targets.coreml import _fast_overflow_check

    cases = [np.float32(3.0), np.float32(7e4), np.array([1.0, -7e4], np.float32),
             np.array([1.0, np.inf, -3e38], np.float32), np.array([np.nan, 2.0], np.float32),
             np.array([65504.0, -65504.0], np.float32), np.zeros((0,), np.float32),
             np.array([[1e38, 65505.0]], np.float32)]
    def program_adding(value: np.ndarray) -> object:
        holder = {}

        def build(x):
            holder["op"] = mb.add(x=x, y=value).op
            return holder["op"].outputs[0]

        shape = (1,) if np.ndim(value) == 0 else value.shape
        mb.program(input_specs=[mb.TensorSpec(shape=shape)])(build)
        return holder["op"]

    for value in cases:
        holder = {"op": program_adding(value)}
        expected = FP16ComputePrecision.fp16_overflow(holder["op"])
        with _fast_overflow_check():
            assert FP16ComputePrecision.fp16_overflow(holder["op"]) == expected, value
