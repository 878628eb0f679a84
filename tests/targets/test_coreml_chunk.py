"""Chunking an mlprogram: chained chunks reproduce the whole program exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from snapc.targets.coreml_chunk import chunk_model, chunks_needed, plan_cuts, weight_bytes  # noqa: E402,I001
from snapc.targets.coreml_mil_interp import load_program, run_program  # noqa: E402

from snapc.errors import SnapcError  # noqa: E402
from tests.targets.coreml_models import SkipNet, convert  # noqa: E402


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chunk") / "whole.mlpackage"
    convert(SkipNet(), (torch.randn(1, 4, 8, 8),)).save(str(path))
    return path


def _repack(program: object):
    return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                      compute_precision=ct.precision.FLOAT32,
                      pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)


@pytest.mark.parametrize("chunks", [2, 3])
def test_chained_chunks_equal_whole(whole: Path, tmp_path: Path, chunks: int) -> None:
    feeds = {"input_0": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    expected = run_program(load_program(whole), feeds)
    pieces = chunk_model(lambda: load_program(whole), chunks, _repack)
    assert len(pieces) == chunks
    values = dict(feeds)
    for model, spec in pieces:
        path = tmp_path / f"chunk{spec.index}.mlpackage"
        model.save(str(path))  # verify what is written, not the in-memory program
        program = load_program(path)
        assert list(program.functions["main"].inputs) == list(spec.inputs)
        values.update(run_program(program, {n: values[n] for n in spec.inputs}))
    (name,) = expected
    np.testing.assert_array_equal(values[name], expected[name])
    total = weight_bytes(load_program(whole))
    assert all(0 < spec.weight_bytes < total for _, spec in pieces)
    assert sum(spec.weight_bytes for _, spec in pieces) >= total * 0.99  # no weight lost


def test_cuts_are_ordered_and_balanced(whole: Path) -> None:
    program = load_program(whole)
    cuts = plan_cuts(program, 3)
    assert cuts == sorted(cuts) and len(set(cuts)) == 2
    ops = list(program.functions["main"].operations)
    assert not any(ops[i].op_type.startswith("const")
                   for i in cuts)


def test_bad_chunk_requests_are_rejected(whole: Path) -> None:
    with pytest.raises(SnapcError, match="at least 2 chunks"):
        chunk_model(lambda: load_program(whole), 1, _repack)
    with pytest.raises(SnapcError, match="fewer chunks"):
        plan_cuts(load_program(whole), 10_000)


def test_chunks_needed() -> None:
    assert chunks_needed(1_720_000_000, 1_000_000_000) == 2
    assert chunks_needed(500, 1_000) == 1
