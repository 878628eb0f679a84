"""The target registry: options and which quantization schemes each target realises."""

from __future__ import annotations

import pytest

from snapc.errors import SnapcError
from snapc.passes.quantize import SCHEMES
from snapc.targets import TARGETS, get_target
from snapc.targets.tvm_quant import REALISED
from snapc.targets.tvm_targets import TVM_TARGETS


def test_unknown_target_option_is_a_snapc_error():
    with pytest.raises(SnapcError, match="target 'onnx' has no option chunks; its options: "):
        get_target("onnx").make_options(chunks=2)
    assert get_target("coreml-palette6").make_options(chunks=2).palettize == 6


def test_quant_schemes_match_what_each_target_realises():
    for entry in TARGETS.values():
        assert set(entry.quant_schemes) <= set(SCHEMES), entry.name
    assert set(TARGETS["onnx"].quant_schemes) == set(SCHEMES)
    assert "w4" not in TARGETS["coreml"].quant_schemes  # no int4 storage in the Core ML target
    for name, spec in TVM_TARGETS.items():
        schemes = set(TARGETS[name].quant_schemes)
        assert schemes - {"mixed", "fp16"} == set(REALISED), name
        assert ("fp16" in schemes) == (spec.default_precision == "fp16"), name


def test_fp16_records_need_an_fp16_build():
    from pathlib import Path

    from snapc.compiler import CompileOptions, check_quantize

    entry = get_target("x86")
    options = CompileOptions(model="tiny", target="x86", out=Path("x"),
                             quantize={"scheme": "fp16"})
    with pytest.raises(SnapcError, match="target 'x86' does not realise --quantize fp16"):
        check_quantize(options, entry, entry.make_options())
    check_quantize(options, entry, entry.make_options(precision="fp16"))
