"""Quantize: scheme math on hand-computed cases, calibration errors, records, fake-quant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snapc.errors import BudgetError, SnapcError
from snapc.frontend import trace
from snapc.numerics import compare
from snapc.passes.quantize import (
    Quantize,
    _changes,
    apply_records_to_module,
    check_scheme,
    coreml_records,
    quant_records,
)
from snapc.passes.quantize_mixed import choose_schemes
from snapc.passes.quantize_observers import (
    CalibrationError,
    calibration_chunks,
    find_fp32_islands,
    uint8_params,
)
from snapc.passes.quantize_schemes import (
    dequantize,
    group_scales,
    kmeans_lut,
    make_record,
    symmetric_scales,
    weight_codes,
)
from snapc.pipeline import PassContext

W = torch.tensor([[1.0, -2.0], [0.5, 0.25]])


def test_per_channel_scales_and_codes_by_hand():
    record = make_record(W, "w8")
    assert torch.allclose(record["scale"], torch.tensor([2 / 127, 0.5 / 127]))
    # 1 / (2/127) = 63.5 and 0.25 / (0.5/127) = 63.5 round half to even -> 64
    assert weight_codes(W, record).tolist() == [[64, -127], [127, 64]]


def test_per_tensor_is_worse_than_per_channel_on_the_small_row():
    per_tensor = symmetric_scales(W.reshape(1, -1), 8)  # one scale: 2/127
    assert torch.allclose(per_tensor, torch.tensor([2 / 127]))
    q = torch.round(W / per_tensor)
    assert q[1].tolist() == [32.0, 16.0]  # 31.75 -> 32, 15.875 -> 16
    err_tensor = (q * per_tensor - W)[1].abs().max()
    err_channel = (dequantize(W, make_record(W, "w8")) - W)[1].abs().max()
    assert err_channel < err_tensor


def test_group_scales_by_hand():
    w = torch.tensor([[1.0, -7.0, 0.5, 0.2, 3.5]])  # groups of 2 along axis 1, last padded
    scales = group_scales(w, 4, 2)
    assert torch.allclose(scales, torch.tensor([[1.0, 0.5 / 7, 0.5]]))
    record = make_record(w, "w4", group_size=2)
    assert weight_codes(w, record).tolist() == [[1, -7, 7, 3, 7]]  # 0.2*7/0.5 -> 3; 3.5/0.5


@pytest.mark.parametrize("scheme", ["w8", "w4", "palette6", "palette4", "fp16"])
def test_scales_round_trip(scheme):
    w = torch.randn(16, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    record = make_record(w, scheme)
    once = dequantize(w, record)
    again = make_record(once, scheme)
    assert torch.equal(dequantize(once, again), once)  # the refitted parameters lose nothing
    for key, value in record.items():
        if isinstance(value, torch.Tensor) and key != "lut":  # unused table entries may move
            assert torch.allclose(value, again[key], rtol=1e-5, atol=1e-7), key
    assert torch.equal(dequantize(once, record), once)  # quantized weights are fixed points


def test_kmeans_recovers_four_clusters():
    centres = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    values = centres.repeat(500) + 0.01 * torch.randn(2000, generator=torch.Generator()
                                                       .manual_seed(1))
    assert torch.allclose(kmeans_lut(values, 2), centres, atol=0.01)


def test_uint8_params_cover_zero():
    scale, zp = uint8_params(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == round(255 / 4)
    assert uint8_params(0.5, 2.0)[1] == 0  # the range is widened to include 0


def test_calibration_errors_name_the_fix(tiny_graph):
    with pytest.raises(CalibrationError, match="empty.*calibration_inputs"):
        calibration_chunks(tiny_graph, ())
    sample, timestep, text = tiny_graph.example_inputs
    with pytest.raises(CalibrationError, match="empty"):
        calibration_chunks(tiny_graph, (sample[:0], timestep[:0], text[:0]))
    with pytest.raises(CalibrationError, match="'sample' has shape"):
        calibration_chunks(tiny_graph, (sample[:, :, :8], timestep, text))
    with pytest.raises(CalibrationError, match="3 inputs"):
        calibration_chunks(tiny_graph, (sample, timestep))
    with pytest.raises(CalibrationError, match="empty"):
        Quantize("w8a8", inputs=()).run(tiny_graph, PassContext())


def test_w8_records_every_layer_and_keeps_the_program(tiny_graph):
    result = Quantize("w8").run(tiny_graph, PassContext())
    records = quant_records(result)
    assert result.modified and len(result.changes) == len(records) > 40
    assert all(c.rule == "quantize_w8" and c.detail["bytes_after"] < c.detail["bytes_before"]
               for c in result.changes)
    assert result.graph.program is tiny_graph.program  # fp32 reference untouched
    reference = tiny_graph.run()
    fake = apply_records_to_module(tiny_graph, records)
    assert 40 < compare(reference, fake.run()).psnr_db < 90
    assert torch.equal(tiny_graph.run(), reference)  # the input graph was not edited
    assert coreml_records(records)["mid_block.resnets.0.conv1.weight"] == {"scheme": "w8"}


def test_second_run_records_no_changes(tiny_graph):
    first = quant_records(Quantize("palette4").run(tiny_graph, PassContext()))
    second = quant_records(Quantize("palette4").run(tiny_graph, PassContext()))
    assert _changes(tiny_graph, first, second) == []  # deterministic, so idempotent
    assert len(_changes(tiny_graph, {}, second)) == len(second)


def test_w8a8_calibrates_inputs_and_conv_outputs(tiny_graph):
    from snapc.calibration import calibration_inputs

    inputs = calibration_inputs(tiny_graph, 2, seed=0)
    for observer in ("percentile", "mse"):
        records = quant_records(Quantize("w8a8", observer=observer, inputs=inputs)
                                .run(tiny_graph, PassContext()))
        conv = records["down_blocks.0.resnets.0.conv1.weight"]
        assert conv["input_scale"] > 0 and 0 <= conv["input_zero_point"] <= 255
        assert "output_scale" in conv and "output_scale" not in records["time_embedding"
                                                                       ".linear_1.weight"]
    fake = apply_records_to_module(tiny_graph, records)
    assert compare(tiny_graph.run(), fake.run()).psnr_db > 20


class _Overflow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x) * 300.0
        return torch.softmax(y * y / 1e4, dim=-1) + y.sigmoid()


def test_fp16_finds_the_overflowing_node():
    torch.manual_seed(0)
    x = torch.randn(2, 8) * 3
    graph = trace(_Overflow(), (x,))
    islands = find_fp32_islands(graph, [(x,)])
    ops = {v["op"] for v in islands.values()}
    assert "aten.mul.Tensor" in ops and all("fp16" in v["reason"] for v in islands.values())
    result = Quantize("fp16", inputs=(x,)).run(graph, PassContext())
    rules = {c.rule for c in result.changes}
    assert rules == {"quantize_fp16", "keep_fp32_island"}
    fake = apply_records_to_module(graph, quant_records(result))
    assert torch.isfinite(fake.run()).all()
    no_islands = {k: v for k, v in quant_records(result).items() if not k.startswith("node:")}
    assert not torch.isfinite(apply_records_to_module(graph, no_islands).run()).all()


def test_mixed_choice_meets_budget_and_floor():
    psnr = {"a": {"w8": 60, "palette6": 50, "palette4": 40},
            "b": {"w8": 60, "palette6": 58, "palette4": 56}}
    sizes = {k: {"w8": 8_000_000, "palette6": 6_000_000, "palette4": 4_000_000} for k in psnr}
    assert choose_schemes(psnr, sizes, 0, size_mb=12) == {"a": "w8", "b": "palette4"}
    assert choose_schemes(psnr, sizes, 0, size_mb=10) == {"a": "palette6", "b": "palette4"}
    assert choose_schemes(psnr, sizes, 0, psnr_floor_db=52) == {"a": "w8", "b": "palette4"}
    from snapc.errors import BudgetError

    with pytest.raises(BudgetError, match="raise --size-mb"):
        choose_schemes(psnr, sizes, 0, size_mb=5)


def test_mixed_on_tiny_reports_per_layer_choices(tiny_graph):
    result = Quantize("mixed", psnr_floor_db=35.0, calibration=1, min_elements=30000).run(
        tiny_graph, PassContext())
    mixed = result.info["mixed"]
    assert set(mixed["layers"]) == set(quant_records(result))
    assert {v["scheme"] for v in mixed["layers"].values()} <= {"w8", "palette6", "palette4"}
    assert all(set(v["sensitivity_psnr_db"]) == {"w8", "palette6", "palette4"}
               for v in mixed["layers"].values())
    assert 4 <= mixed["mean_bits"] < 8 and mixed["psnr_db"] > 32  # floor 35 is an estimate


@pytest.mark.parametrize(("scheme", "size_mb", "floor", "message"), [
    ("int3", None, None, "unknown quantization scheme 'int3'"),
    ("w8", 10.0, None, "--size-mb applies only to --quantize mixed"),
    ("w4", 10.0, 30.0, "--size-mb and --psnr-floor apply only"),
    ("mixed", None, None, "exactly one of --size-mb"),
    ("mixed", 10.0, 30.0, "exactly one of --size-mb"),
    ("mixed", 0.0, None, "megabytes > 0"),
])
def test_scheme_and_budget_combinations_are_checked(scheme, size_mb, floor, message):
    with pytest.raises(SnapcError, match=message):
        check_scheme(scheme, size_mb, floor)
    with pytest.raises(SnapcError, match=message):
        Quantize(scheme, size_mb=size_mb, psnr_floor_db=floor).check()
    check_scheme("mixed", size_mb=1.0)  # the valid ones pass
    check_scheme("w8")


def test_unreachable_size_budget_fails_before_measuring(tiny_graph, monkeypatch):
    import snapc.passes.quantize as quantize

    def measured(*args, **kwargs):
        raise AssertionError("sensitivity measured for an unreachable budget")

    monkeypatch.setattr(quantize, "layer_sensitivity", measured)
    with pytest.raises(BudgetError, match=r"cannot reach 0.5 MB \(smallest is over 0.7"):
        Quantize("mixed", size_mb=0.5).run(tiny_graph, PassContext())
