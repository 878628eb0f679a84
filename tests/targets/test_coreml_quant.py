"""Per-layer quantization records -> coremltools.optimize.coreml on the converted program."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from snapc.errors import SnapcError  # noqa: E402
from snapc.numerics import compare  # noqa: E402
from snapc.targets.coreml_mil_interp import run_program  # noqa: E402
from snapc.targets.coreml_quant import (  # noqa: E402
    MIN_WEIGHT_ELEMENTS,
    apply_quantization,
    plan_quantization,
    weight_sizes,
)
from tests.targets.coreml_models import SkipNet, convert  # noqa: E402

WEIGHTS = {"net_down_blocks_0_resnets_0_conv1_weight_to_fp16": 20_000,
           "net_down_blocks_0_resnets_0_conv1_bias_to_fp16": 320,
           "net_mid_block_attentions_0_proj_in_weight_to_fp16": 50_000,
           "net_conv_in_weight_to_fp16": 1_000}


def test_records_map_layers_and_weights_to_constants() -> None:
    plan = plan_quantization(WEIGHTS, {"down_blocks.0.resnets.0.conv1": {"scheme": "w8"},
                                       "net.mid_block.attentions.0.proj_in.weight":
                                           {"scheme": "palette4"}}, None)
    assert plan.schemes == {"net_down_blocks_0_resnets_0_conv1_weight_to_fp16": "w8",
                            "net_mid_block_attentions_0_proj_in_weight_to_fp16": "palette4"}
    assert plan.unmatched == ()


def test_global_palettize_skips_small_and_recorded_weights() -> None:
    plan = plan_quantization(WEIGHTS, {"mid_block.attentions.0.proj_in": {"scheme": "fp16"},
                                       "conv_in": {"scheme": "w8"}}, 6)
    assert plan.schemes == {"net_down_blocks_0_resnets_0_conv1_weight_to_fp16": "palette6"}
    assert plan.too_small == ("net_conv_in_weight_to_fp16",)
    assert plan.counts() == {"palette6": 1}


def test_bad_records_are_rejected() -> None:
    with pytest.raises(SnapcError, match="scheme 'int3'"):
        plan_quantization(WEIGHTS, {"conv_in": {"scheme": "int3"}}, None)
    with pytest.raises(SnapcError, match="5 bits"):
        plan_quantization(WEIGHTS, None, 5)
    assert plan_quantization(WEIGHTS, {"no.such.layer": {"scheme": "w8"}}, None).unmatched == (
        "no.such.layer",)


def test_quantized_program_runs_in_the_interpreter() -> None:
    torch.manual_seed(0)
    module = SkipNet(channels=48).eval()
    x = torch.randn(1, 4, 8, 8)
    program = convert(module, (x,))._mil_program
    feeds = {"input_0": x.numpy()}
    (name,) = [v.name for v in program.functions["main"].outputs]
    before = run_program(program, feeds)[name]
    sizes = weight_sizes(program)
    assert sum(n >= MIN_WEIGHT_ELEMENTS for n in sizes.values()) == 2  # the two mid convs
    plan = plan_quantization(sizes, {"mid.0": {"scheme": "w8"}}, 6)
    assert plan.counts() == {"w8": 1, "palette6": 1}
    apply_quantization(program, plan)
    ops = [op.op_type for op in program.functions["main"].operations]
    assert ops.count("constexpr_lut_to_dense") == 1
    assert ops.count("constexpr_affine_dequantize") == 1
    after = run_program(program, feeds)[name]
    assert not np.array_equal(before, after)  # the weights really changed
    with torch.no_grad():
        reference = module(x)
    assert compare(reference, after.astype(np.float32)).psnr_db > 30


APPLIED = {"down_blocks.0.resnets.0.conv1.weight": {"scheme": "palette6"},
           "mid_block.attentions.0.proj_in.weight": {"scheme": "w8"},
           "conv_in.weight": {"scheme": "palette4"},
           "up_blocks.0.attentions.0.to_q.weight": {"scheme": "palette4"},
           "up_blocks.0.norm.weight": {"scheme": "fp16"}}


def test_applied_records_are_exact_and_may_miss_without_error() -> None:
    plan = plan_quantization(WEIGHTS, {"down_blocks.0.resnets.0.conv1": {"scheme": "w8"}}, None,
                             applied=APPLIED)
    assert plan.schemes == {"net_down_blocks_0_resnets_0_conv1_weight_to_fp16": "w8",
                            "net_mid_block_attentions_0_proj_in_weight_to_fp16": "w8"}
    # the explicit record overrides the applied one, which is then no longer exact
    assert plan.exact == {"net_mid_block_attentions_0_proj_in_weight_to_fp16"}
    assert plan.unmatched == ()  # applied records that name no constant are not an error...
    assert plan.not_found == ("up_blocks.0.attentions.0.to_q.weight",)  # ...but reported
    assert plan.too_small == ("net_conv_in_weight_to_fp16",)


def test_applied_records_keep_their_look_up_table_and_scales() -> None:
    from snapc.passes.quantize_schemes import dequantize, make_record, weight_codes

    torch.manual_seed(0)
    module = SkipNet(channels=48).eval()
    records = {"mid.0.weight": make_record(module.mid[0].weight.data, "palette4"),
               "mid.2.weight": make_record(module.mid[2].weight.data, "w8")}
    codes = weight_codes(module.mid[2].weight.data, records["mid.2.weight"])
    with torch.no_grad():  # what the target converts: the weights the records give
        for layer, key in ((module.mid[0], "mid.0.weight"), (module.mid[2], "mid.2.weight")):
            layer.weight.copy_(dequantize(layer.weight.data, records[key]))
    program = convert(module, (torch.randn(1, 4, 8, 8),))._mil_program
    applied = {k: {"scheme": r["scheme"]} for k, r in records.items()}
    plan = plan_quantization(weight_sizes(program), None, None, applied=applied)
    assert plan.exact == set(plan.schemes) and len(plan.schemes) == 2
    apply_quantization(program, plan)
    ops = {op.op_type: op for op in program.functions["main"].operations
           if op.op_type.startswith("constexpr_")}
    lut = np.sort(ops["constexpr_lut_to_dense"].inputs["lut"].val.ravel().astype(np.float32))
    # the package stores the record's own table (in fp16) and int8 codes, not new ones
    assert np.allclose(lut, np.sort(records["mid.0.weight"]["lut"].numpy()), rtol=1e-3, atol=0)
    int8 = ops["constexpr_affine_dequantize"].inputs
    assert np.array_equal(int8["quantized_data"].val, codes.numpy())
    assert np.allclose(int8["scale"].val, records["mid.2.weight"]["scale"].numpy(), rtol=1e-3)


def test_histogram_unique_palettizes_like_coremltools() -> None:
    from coremltools.models.neural_network import quantization_utils as utils
    from coremltools.optimize.coreml import _quantization_passes as passes

    from snapc.targets.coreml_quant import _fp16_unique, _histogram_unique

    rng = np.random.default_rng(0)
    signed_zeros = np.concatenate([np.zeros(300), -np.zeros(200)])
    for weight in ((rng.standard_normal(200_000) * 0.02).astype(np.float16),
                   np.concatenate([signed_zeros, rng.standard_normal(30_000)]).astype(np.float16)):
        # in float32 (exact for fp16 values): numpy's AVX-512 float16 sort mis-orders some
        # arrays on some CPUs, so np.unique of the fp16 array itself is no reference
        values, inverse, counts = np.unique(weight.astype(np.float32), return_inverse=True,
                                            return_counts=True)
        got = _fp16_unique(weight)
        np.testing.assert_array_equal(got[0].astype(np.float32), values)
        np.testing.assert_array_equal(got[1], inverse.ravel())
        np.testing.assert_array_equal(got[2], counts)
        expected = utils._get_kmeans_lookup_table_and_weight(6, weight)
        with _histogram_unique():
            lut, indices = passes._get_kmeans_lookup_table_and_weight(6, weight)
        np.testing.assert_array_equal(lut, expected[0])
        np.testing.assert_array_equal(indices, expected[1])
    assert passes._get_kmeans_lookup_table_and_weight is utils._get_kmeans_lookup_table_and_weight


def test_exact_palette_keeps_the_records_bits() -> None:
    # 16 fp16 values, repeated: numpy's AVX-512 float16 sort mis-orders such arrays on some CPUs
    # (np.unique then finds 18-42 values here and coremltools' mode "unique" took 6 bits)
    from snapc.targets.coreml_quant import _unique_lut

    rng = np.random.default_rng(0)
    table = np.sort(rng.standard_normal(16) * 0.02).astype(np.float16)
    weight = table[rng.integers(0, 16, 20_000)].reshape(20, 1000)
    lut, indices = _unique_lut(weight)
    assert lut.dtype == np.float16 and lut.shape == (16,) and indices.dtype == np.uint8
    np.testing.assert_array_equal(lut[indices].reshape(weight.shape), weight)
    np.testing.assert_array_equal(np.sort(lut.astype(np.float32)), table.astype(np.float32))
