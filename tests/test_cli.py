"""The CLI end to end: compile, inspect, passes, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from safetensors.torch import save_file

from snapc.models import load_model


def snapc(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m snapc ARGS` and return the finished process."""
    return subprocess.run([sys.executable, "-m", "snapc", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_compile_tiny_onnx(tmp_path):
    out = tmp_path / "out"
    proc = snapc("compile", "tiny", "--target", "onnx", "-o", str(out),
                 "--remove", "mid_block.attentions.0")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"]
    assert manifest["passes"][0]["name"] == "remove_blocks"
    assert manifest["passes"][0]["rule_counts"] == {"transformer_to_identity": 1}
    assert "random weights" in proc.stderr
    # the folder exists now: without --force it is an error and stays as it was
    again = snapc("compile", "tiny", "--target", "onnx", "-o", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_inspect_json_sd15():
    proc = snapc("inspect", "sd15", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["totals"]["resnet_blocks"] == 22
    assert report["totals"]["transformer_blocks"] == 16
    assert report["totals"]["params"] == 859_520_964
    assert len(report["blocks"]) == 38


@pytest.mark.parametrize("args,message", [
    (["compile", "sd99", "--target", "onnx", "-o", "x"], "unknown model 'sd99'"),
    (["compile", "tiny", "--target", "gpu9", "-o", "x"], "unknown target 'gpu9'"),
    (["compile", "tiny", "--target", "onnx", "-o", "x", "--remove", "down_blocks.7.resnets.0"],
     "unknown block 'down_blocks.7.resnets.0'"),
])
def test_bad_names_are_one_line_errors(tmp_path, args, message):
    proc = snapc(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_corrupt_weights_exit_2(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in load_model("tiny").module.state_dict().items()},
              str(path))
    path.write_bytes(path.read_bytes()[:1000])
    proc = snapc("compile", str(path), "--arch", "tiny", "--target", "onnx", "-o",
                 str(tmp_path / "o"))
    assert proc.returncode == 2 and "corrupt weights file" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_passes_lists_remove_blocks():
    proc = snapc("passes")
    assert proc.returncode == 0 and "remove_blocks" in proc.stdout


def test_search_writes_record_and_front(tmp_path):
    record_path = tmp_path / "search.json"
    proc = snapc("search", "tiny", "--device", "iphone14pro-ane", "--budget", "0.85",
                 "--calibration", "2", "-o", str(record_path))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(record_path.read_text())
    assert record["stop"] == "budget met" and record["chosen"]
    assert record_path.with_suffix(".png").stat().st_size > 10_000
    assert "front" in proc.stdout


def test_compile_with_impossible_budget_exit_2(tmp_path):
    proc = snapc("compile", "tiny", "--target", "onnx", "-o", str(tmp_path / "o"),
                 "--device", "iphone14pro-ane", "--budget", "0.01")
    assert proc.returncode == 2 and "out of reach" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_compile_tiny_onnx_quantized_is_qdq_and_verified(tmp_path):
    out = tmp_path / "q"
    proc = snapc("compile", "tiny", "--target", "onnx", "-o", str(out), "--quantize", "w8")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    quant, ver = manifest["quantization"], manifest["verification"]
    assert quant["scheme"] == "w8" and quant["counts"]["w8"] == len(quant["layers"]) > 40
    assert quant["realised"]["realised"]["w8"] > 40
    assert "fake-quantized" in ver["reference"] and ver["psnr_db"] >= ver["min_psnr_db"] == 60
    assert 35 < ver["vs_fp32"]["psnr_db"] < ver["psnr_db"]
    assert manifest["passes"][-1]["name"] == "quantize"
    model = onnx.load(str(out / "model.onnx"))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == quant["realised"]["realised"]["w8"]
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(int8)
    assert "quantized" in proc.stdout and "PSNR vs fp32" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--quantize", "w8", "--size-mb", "2"], "--size-mb applies only to --quantize mixed"),
    (["--quantize", "mixed"], "exactly one of --size-mb"),
    (["--quantize", "int3"], "unknown quantization scheme 'int3'"),
    (["--psnr-floor", "30"], "need --quantize mixed"),
    (["--quantize", "w4", "--target", "coreml"], "target 'coreml' does not realise"),
    (["--quantize", "fp16", "--target", "x86"], "target 'x86' does not realise"),
    (["--coreml-chunks", "2"], "--coreml-chunks applies only to the coreml targets"),
    (["--target", "coreml", "--coreml-frontend", "jit"], "frontend 'jit' is not valid"),
    (["--quantize", "mixed", "--size-mb", "0.5"], "cannot reach 0.5 MB"),
])
def test_bad_quantize_and_coreml_options_are_one_line_errors(tmp_path, args, message):
    target = [] if "--target" in args else ["--target", "onnx"]
    proc = snapc("compile", "tiny", *target, "-o", "x", *args, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_coreml_flags_reach_the_target_options(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import snapc.compiler
    from snapc.cli import app
    from snapc.errors import SnapcError

    seen = []

    def capture(options, reporter=None):
        seen.append(options)
        raise SnapcError("captured")

    monkeypatch.setattr(snapc.compiler, "compile_model", capture)
    result = CliRunner().invoke(app, [
        "compile", "tiny", "--target", "coreml-palette6", "-o", str(tmp_path / "o"),
        "--quantize", "palette4", "--calibration", "2", "--coreml-frontend", "export",
        "--coreml-chunks", "2", "--coreml-palettize", "4", "--coreml-deployment-target",
        "iOS18", "--coreml-compute-units", "ALL", "--coreml-attention", "original",
        "--coreml-verifier", "interpreter"])
    assert result.exit_code == 2 and len(seen) == 1
    assert seen[0].target_options == {
        "frontend": "export", "chunks": 2, "palettize": 4, "deployment_target": "iOS18",
        "compute_units": "ALL", "attention": "original", "verifier": "interpreter"}
    assert seen[0].quantize == {"scheme": "palette4", "size_mb": None, "psnr_floor_db": None,
                                "calibration": 2, "seed": 0}
