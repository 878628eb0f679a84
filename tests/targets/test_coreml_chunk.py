"""Chunking an mlpackage: chained chunks reproduce the whole program exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from snapc.errors import SnapcError  # noqa: E402
from snapc.targets.coreml_chunk import (  # noqa: E402
    chunks_needed,
    plan_cuts,
    read_ops,
    split_package,
    weight_bytes,
)
from snapc.targets.coreml_mil_interp import load_program, run_program  # noqa: E402
from tests.targets.coreml_models import SkipNet, convert  # noqa: E402


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chunk") / "whole.mlpackage"
    convert(SkipNet(), (torch.randn(1, 4, 8, 8),)).save(str(path))
    return path


@pytest.fixture(scope="module")
def palettized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from snapc.targets.coreml_quant import apply_quantization, plan_quantization, weight_sizes

    torch.manual_seed(0)
    program = convert(SkipNet(channels=48), (torch.randn(1, 4, 8, 8),))._mil_program
    apply_quantization(program, plan_quantization(weight_sizes(program), None, 6))
    path = tmp_path_factory.mktemp("chunk") / "palettized.mlpackage"
    ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
               compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
               skip_model_load=True).save(str(path))
    return path


def _chain(whole: Path, folder: Path, chunks: int) -> None:
    feeds = {"input_0": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    expected = run_program(load_program(whole), feeds)
    paths = [folder / f"chunk{k}.mlpackage" for k in range(1, chunks + 1)]
    specs = split_package(whole, chunks, paths)
    assert len(specs) == chunks
    values = dict(feeds)
    for path, spec in zip(paths, specs, strict=True):
        program = load_program(path)  # verify what is written
        assert list(program.functions["main"].inputs) == list(spec.inputs)
        assert [v.name for v in program.functions["main"].outputs] == list(spec.outputs)
        values.update(run_program(program, {n: values[n] for n in spec.inputs}))
    (name,) = expected
    np.testing.assert_array_equal(values[name], expected[name])
    total = weight_bytes(load_program(whole))
    assert all(0 < spec.weight_bytes < total for spec in specs)
    assert sum(spec.weight_bytes for spec in specs) >= total * 0.99  # no weight lost


@pytest.mark.parametrize("chunks", [2, 3])
def test_chained_chunks_equal_whole(whole: Path, tmp_path: Path, chunks: int) -> None:
    _chain(whole, tmp_path, chunks)


def test_palettized_chunks_equal_whole(palettized: Path, tmp_path: Path) -> None:
    assert any(op.kind.startswith("constexpr") for op in read_ops(ct.utils.load_spec(
        str(palettized))))
    _chain(palettized, tmp_path, 2)


def test_cuts_are_ordered_and_balanced(whole: Path) -> None:
    spec = ct.utils.load_spec(str(whole))
    ops = read_ops(spec)
    cuts = plan_cuts(ops, {"var_out"}, 3)
    assert cuts == sorted(cuts) and len(set(cuts)) == 2
    assert not any(ops[i].weight for i in cuts)


def test_bad_chunk_requests_are_rejected(whole: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapcError, match="at least 2 chunks"):
        split_package(whole, 1, [tmp_path / "a.mlpackage"])
    with pytest.raises(SnapcError, match="fewer chunks"):
        plan_cuts(read_ops(ct.utils.load_spec(str(whole))), set(), 10_000)


def test_chunks_needed() -> None:
    assert chunks_needed(1_720_000_000, 1_000_000_000) == 2
    assert chunks_needed(500, 1_000) == 1
