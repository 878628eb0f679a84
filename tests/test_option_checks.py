"""Bad options of `snapc compile` / `snapc search` (and compile_model) fail before any model is
loaded: one `error:` line naming the fix, exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import snapc.compiler
from snapc.cli import app
from snapc.compiler import CompileOptions, compile_model
from snapc.errors import SnapcError

SEARCH = ["--device", "iphone14pro-ane", "--budget", "0.8"]


class Loaded(Exception):
    """Raised by the patched loaders: the options passed their checks."""


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise Loaded("the model was loaded")

    monkeypatch.setattr(snapc.compiler, "load_model", load)
    monkeypatch.setattr(snapc.compiler, "load_graph", load)


def _error_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert not isinstance(result.exception, Loaded), f"{args}: checked after loading"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--device", "nosuch", "--budget", "0.8"], "unknown device 'nosuch'; valid devices:"),
    (["--device", "missing.toml", "--budget", "0.8"], "device profile file not found"),
    (["--budget", "0.8"], "block search needs a device: --device NAME"),
    (["--keep", "mid_block.attentions.0"], "--keep chooses blocks by search"),
    (["--device", "iphone14pro-ane"], "needs a latency budget: add --budget F"),
    ([*SEARCH, "--budget-ms", "3"], "--budget and --budget-ms both give the latency budget"),
    (["--device", "iphone14pro-ane", "--budget", "1.0"], "--budget 1.0 is not a fraction"),
    (["--device", "iphone14pro-ane", "--budget", "0"], "give 0 < F < 1"),
    (["--device", "iphone14pro-ane", "--budget", "-0.5"], "give 0 < F < 1"),
    (["--device", "iphone14pro-ane", "--budget-ms", "0"], "give milliseconds > 0"),
    ([*SEARCH, "--table", "nope.json"], "latency table not found: nope.json"),
    ([*SEARCH, "--proxy-space", "z0"], "is not a proxy space"),
    ([*SEARCH, "--keep", "mid_block.attentions.0", "--remove", "mid_block.attentions.0"],
     "both removed (--remove) and pinned (--keep)"),
    (["--fusions", "fuse_nothing"], "unknown fusion 'fuse_nothing'"),
    (["--quantize", "int3"], "unknown quantization scheme 'int3'"),
    (["--quantize", "w8", "--size-mb", "2"], "--size-mb applies only to --quantize mixed"),
    (["--psnr-floor", "30"], "need --quantize mixed"),
    (["--quantize", "w4", "--target", "coreml"], "target 'coreml' does not realise"),
    (["--coreml-chunks", "2"], "--coreml-chunks applies only to the coreml targets"),
    (["--target", "gpu9", "--coreml-chunks", "2"], "unknown target 'gpu9'"),
    (["--target", "coreml", "--coreml-frontend", "jit"], "frontend 'jit' is not valid"),
    (["--tensor-cores"], "--tensor-cores applies only to the TVM targets"),
    (["--precision", "fp16"], "--precision applies only to the TVM targets"),
    (["--target", "x86", "--tensor-cores"], "tensor cores apply to the cuda target, not x86"),
    (["--target", "cuda", "--tensor-cores"], "tensor cores need fp16 compute: add --precision"),
    (["--target", "cuda", "--precision", "int8"], "precision must be fp16 or fp32, got 'int8'"),
])
def test_compile_checks_options_before_loading(no_loading, tmp_path, args, message):
    target = [] if "--target" in args else ["--target", "onnx"]
    line = _error_line(["compile", "sd15", *target, "-o", str(tmp_path / "x"), *args])
    assert message in line
    assert not (tmp_path / "x").exists()


def test_a_broken_device_profile_is_named(no_loading, tmp_path):
    profile = tmp_path / "phone.toml"
    profile.write_text("peak_tflops = [")
    line = _error_line(["compile", "sd15", "--target", "onnx", "-o", str(tmp_path / "x"),
                        "--device", str(profile), "--budget", "0.8"])
    assert f"cannot read device profile {profile}" in line


def test_good_options_reach_the_loader(no_loading, tmp_path):
    result = CliRunner().invoke(app, ["compile", "sd15", "--target", "onnx",
                                      "-o", str(tmp_path / "x"), *SEARCH, "--keep", "conv_in"])
    assert isinstance(result.exception, Loaded), result.output


@pytest.mark.parametrize("args,message", [
    (["--device", "nosuch"], "unknown device 'nosuch'"),
    (["--budget", "1.5"], "--budget 1.5 is not a fraction"),
    (["--budget", "0.8", "--budget-ms", "2"], "give one"),
    (["--budget-ms", "-1"], "give milliseconds > 0"),
    (["--quality-floor", "0"], "is not a proxy loss"),
    (["-o", "no/such/folder/search.json"], "folder no/such/folder does not exist"),
])
def test_search_checks_options_before_loading(no_loading, args, message):
    assert message in _error_line(["search", "sd15", *args])


@pytest.mark.parametrize("changes,message", [
    ({"search": {"device": "nosuch", "budget": 0.8}}, "unknown device 'nosuch'"),
    ({"search": {"device": "h100", "budget": 0.8, "budgett": 1}},
     "CompileOptions.search has no option budgett"),
    ({"search": {"device": "h100"}}, "by search, which needs a latency budget"),
    ({"quantize": {"scheme": "w8", "bits": 3}}, "CompileOptions.quantize has no option bits"),
    ({"batch": 0}, "--batch 0"),
    ({"target_options": {"chunks": 2}}, "target 'onnx' has no option chunks"),
])
def test_compile_model_checks_options_first(no_loading, tmp_path, changes, message):
    options = CompileOptions(model="sd15", target="onnx", out=tmp_path / "x")
    with pytest.raises(SnapcError) as caught:
        compile_model(dataclasses.replace(options, **changes))
    assert message in str(caught.value)


def test_unknown_device_fails_fast_from_the_shell(tmp_path):
    # sd15 takes minutes to load and trace; the error comes before any of it
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snapc", "compile", "sd15", "--target", "onnx",
                           "-o", str(tmp_path / "x"), "--device", "iphone15", "--budget", "0.8"],
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown device 'iphone15'") and "iphone14pro-ane" in lines[0]
    assert seconds < 60 and not Path(tmp_path / "x").exists()
