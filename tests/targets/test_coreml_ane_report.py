"""ANE report: a model built to break Neural Engine constraints, and a clean one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools")

from snapc.targets.coreml_ane_report import MAX_SPATIAL, ane_report  # noqa: E402
from tests.targets.coreml_models import SkipNet, convert  # noqa: E402


class Breaker(nn.Module):
    """Breaks one constraint per layer: dilation, gather, a huge width, int math."""

    def __init__(self) -> None:
        super().__init__()
        self.dilated = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
        self.table = nn.Embedding(10, 8)
        self.wide = nn.Linear(8, MAX_SPATIAL + 100)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.dilated(x)                                   # dilated_conv
        looked = self.table(ids)                              # gather
        wide = self.wide(looked)                              # large_dim (last axis)
        return h.mean() + wide.mean() + (ids * 3).sum().float()  # int32 math


@pytest.fixture(scope="module")
def breaker_report():
    torch.manual_seed(0)
    inputs = [ct.TensorType(name="x", shape=(1, 4, 4, 4), dtype=np.float32),
              ct.TensorType(name="ids", shape=(1, 5), dtype=np.int32)]
    model = convert(Breaker(), (torch.randn(1, 4, 4, 4), torch.randint(0, 10, (1, 5))),
                    inputs=inputs)
    return ane_report(model._mil_program)


def test_each_broken_constraint_is_reported(breaker_report) -> None:
    rules = breaker_report.counts()
    for rule in ("dilated_conv", "unsupported_op", "large_dim", "dtype"):
        assert rules.get(rule, 0) >= 1, (rule, rules)
    by_rule = {i.rule: i for i in breaker_report.issues}
    assert by_rule["unsupported_op"].op_type == "gather"
    assert "table" in by_rule["unsupported_op"].layer  # the layer is named
    assert by_rule["dilated_conv"].layer.startswith("dilated")
    assert by_rule["large_dim"].shape[-1] == MAX_SPATIAL + 100
    assert all(i.reason and i.to_json()["source"].startswith("https://")
               for i in breaker_report.issues)


def test_rank_above_five_is_reported() -> None:
    # Core ML's serializer itself refuses rank 6, so build the MIL program directly.
    from coremltools.converters.mil import Builder as mb

    prog = mb.program(input_specs=[mb.TensorSpec(shape=(1, 128))])(
        lambda x: mb.relu(x=mb.reshape(x=x, shape=[1, 2, 2, 2, 2, 8])))
    report = ane_report(prog)
    assert report.counts()["rank"] == 2  # the reshape and the relu after it (fp32: dtype too)


def test_dynamic_shapes_are_reported() -> None:
    inputs = [ct.TensorType(name="x", shape=(1, 4, ct.RangeDim(4, 64), ct.RangeDim(4, 64)),
                            dtype=np.float32)]
    model = convert(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU()),
                    (torch.randn(1, 4, 8, 8),), inputs=inputs)
    report = ane_report(model._mil_program)
    assert report.counts().get("dynamic_shape", 0) >= 2  # the input and the ops after it
    assert any(i.op_type == "input" for i in report.issues)


def test_static_fp16_convnet_is_clean(tmp_path: Path) -> None:
    model = convert(SkipNet(), (torch.randn(1, 4, 8, 8),))
    report = ane_report(model._mil_program, layer_of=lambda op: "")
    assert report.clean, report.to_json()["issues"][:3]
    data = json.loads(report.write(tmp_path / "r.json").read_text())
    assert data["clean"] and data["ops_checked"] > 10
