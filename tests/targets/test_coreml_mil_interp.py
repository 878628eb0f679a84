"""The numpy MIL interpreter, op by op against torch (fp32 programs: tight tolerances)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from snapc.errors import UnsupportedOpsError  # noqa: E402
from snapc.targets.coreml_mil_interp import run_program, supported_ops  # noqa: E402

RNG = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _run(build: Callable[..., object], *inputs: np.ndarray,
         opset: object = None) -> dict[str, np.ndarray]:
    specs = [mb.TensorSpec(shape=x.shape) for x in inputs]
    prog = mb.program(input_specs=specs, opset_version=opset or ct.target.iOS17)(build)
    names = list(prog.functions["main"].inputs)
    return run_program(prog, dict(zip(names, inputs, strict=True)))


def _only(out: dict[str, np.ndarray]) -> np.ndarray:
    (value,) = out.values()
    return value


X = _randn(2, 8, 6, 6)
W3 = _randn(12, 8, 3, 3)
B12 = _randn(12)
SEQ = _randn(2, 5, 16)
LIN_W, LIN_B = _randn(10, 16), _randn(10)
_G16, _B16, _G8, _B8 = _randn(16), _randn(16), _randn(8), _randn(8)
T = torch.from_numpy

# name -> (MIL builder on inputs, torch reference on the same inputs, inputs)
CASES: dict[str, tuple[Callable[..., object], Callable[..., torch.Tensor], tuple]] = {
    "conv": (lambda x: mb.conv(x=x, weight=W3, bias=B12, pad_type="custom", pad=[1, 1, 1, 1]),
             lambda x: F.conv2d(x, T(W3), T(B12), padding=1), (X,)),
    "conv_stride_same": (lambda x: mb.conv(x=x, weight=W3, strides=[2, 2], pad_type="same"),
                         lambda x: F.conv2d(F.pad(x, (0, 1, 0, 1)), T(W3), stride=2), (X,)),
    "conv_grouped_dilated": (
        lambda x: mb.conv(x=x, weight=W3[:, :4], groups=2, dilations=[2, 2], pad_type="valid"),
        lambda x: F.conv2d(x, T(W3[:, :4]), groups=2, dilation=2), (X,)),
    "conv1d": (lambda x: mb.conv(x=x, weight=W3[:, :, 0], pad_type="custom", pad=[1, 1]),
               lambda x: F.conv1d(x, T(W3[:, :, 0]), padding=1), (X[:, :, 0],)),
    "linear": (lambda x: mb.linear(x=x, weight=LIN_W, bias=LIN_B),
               lambda x: F.linear(x, T(LIN_W), T(LIN_B)), (SEQ,)),
    "matmul_transposed": (lambda x, y: mb.matmul(x=x, y=y, transpose_y=True),
                          lambda x, y: x @ y.transpose(-1, -2), (SEQ, _randn(2, 7, 16))),
    "einsum": (lambda a, b: mb.einsum(values=(a, b), equation="nchw,nwhu->nchu"),
               lambda a, b: torch.einsum("nchw,nwhu->nchu", a, b),
               (_randn(1, 2, 3, 4), _randn(1, 4, 3, 5))),
    "softmax": (lambda x: mb.softmax(x=x, axis=-1), lambda x: x.softmax(-1), (SEQ,)),
    "layer_norm": (lambda x: mb.layer_norm(x=x, axes=[-1], gamma=_G16, beta=_B16, epsilon=1e-5),
                   lambda x: F.layer_norm(x, (16,), T(_G16), T(_B16), 1e-5), (SEQ,)),
    "instance_norm": (lambda x: mb.instance_norm(x=x, gamma=_G8, beta=_B8, epsilon=1e-5),
                      lambda x: F.instance_norm(x, weight=T(_G8), bias=T(_B8), eps=1e-5), (X,)),
    "batch_norm": (lambda x: mb.batch_norm(x=x, mean=_B8, variance=np.abs(_G8) + 0.5,
                                           gamma=_G8, beta=_B8, epsilon=1e-5),
                   lambda x: F.batch_norm(x, T(_B8), T(np.abs(_G8) + 0.5), T(_G8), T(_B8),
                                          eps=1e-5), (X,)),
    "reduce_mean": (lambda x: mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True),
                    lambda x: x.mean((2, 3), keepdim=True), (X,)),
    "reduce_sum": (lambda x: mb.reduce_sum(x=x, axes=[1]), lambda x: x.sum(1), (X,)),
    "reduce_max": (lambda x: mb.reduce_max(x=x, axes=[-1]), lambda x: x.amax(-1), (X,)),
    "silu": (lambda x: mb.silu(x=x), F.silu, (X,)),
    "gelu_exact": (lambda x: mb.gelu(x=x), F.gelu, (X,)),
    "gelu_tanh": (lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
                  lambda x: F.gelu(x, approximate="tanh"), (X,)),
    "sigmoid": (lambda x: mb.sigmoid(x=x), torch.sigmoid, (X,)),
    "relu": (lambda x: mb.relu(x=x), F.relu, (X,)),
    "tanh": (lambda x: mb.tanh(x=x), torch.tanh, (X,)),
    "sin_cos": (lambda x: mb.add(x=mb.sin(x=x), y=mb.cos(x=x)),
                lambda x: x.sin() + x.cos(), (X,)),
    "exp_sqrt_square": (lambda x: mb.sqrt(x=mb.add(x=mb.square(x=x), y=mb.exp(x=x))),
                        lambda x: (x.square() + x.exp()).sqrt(), (X,)),
    "rsqrt": (lambda x: mb.rsqrt(x=mb.abs(x=x)), lambda x: (x.abs() + 1e-12).rsqrt(), (X,)),
    "arith": (lambda x, y: mb.real_div(x=mb.sub(x=mb.mul(x=x, y=y), y=y),
                                       y=mb.add(x=mb.abs(x=y), y=1.0)),
              lambda x, y: (x * y - y) / (y.abs() + 1), (X, _randn(1, 8, 1, 6))),
    "pow_max_min": (lambda x: mb.maximum(x=mb.minimum(x=mb.pow(x=mb.abs(x=x), y=1.5), y=2.0),
                                         y=0.1),
                    lambda x: x.abs().pow(1.5).clamp(0.1, 2.0), (X,)),
    "clip": (lambda x: mb.clip(x=x, alpha=-0.5, beta=0.5), lambda x: x.clamp(-0.5, 0.5), (X,)),
    "reshape_transpose": (lambda x: mb.transpose(x=mb.reshape(x=x, shape=[2, 8, 36]),
                                                 perm=[0, 2, 1]),
                          lambda x: x.reshape(2, 8, 36).transpose(1, 2), (X,)),
    "expand_squeeze": (lambda x: mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]),
                       lambda x: x, (SEQ,)),
    "concat": (lambda x, y: mb.concat(values=[x, y], axis=1),
               lambda x, y: torch.cat([x, y], 1), (X, _randn(2, 3, 6, 6))),
    "concat_interleave": (lambda x, y: mb.concat(values=[x, y], axis=1, interleave=True),
                          lambda x, y: torch.stack([x, y], 2).reshape(2, 16, 6, 6), (X, X * 2)),
    "split_sizes": (lambda x: mb.split(x=x, split_sizes=[3, 5], axis=1)[1],
                    lambda x: x[:, 3:], (X,)),
    "split_chunks": (lambda x: mb.split(x=x, num_splits=2, axis=-1)[0],
                     lambda x: x.chunk(2, -1)[0], (SEQ,)),
    "slice_by_index": (lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0, 0], end=[2, 7, 6, 5],
                                                   stride=[1, 2, 1, 2],
                                                   end_mask=[True, False, True, False]),
                       lambda x: x[:, 1:7:2, :, 0:5:2], (X,)),
    "slice_squeeze": (lambda x: mb.slice_by_index(x=x, begin=[0, 2, 0], end=[2, 3, 16],
                                                  squeeze_mask=[False, True, False]),
                      lambda x: x[:, 2], (SEQ,)),
    "slice_by_size": (lambda x: mb.slice_by_size(x=x, begin=[0, 1, 0], size=[2, 3, -1]),
                      lambda x: x[:, 1:4], (SEQ,)),
    "tile": (lambda x: mb.tile(x=x, reps=[1, 2, 1]), lambda x: x.repeat(1, 2, 1), (SEQ,)),
    "gather": (lambda x: mb.gather(x=x, indices=np.array([4, 0, 2], np.int32), axis=1),
               lambda x: x[:, [4, 0, 2]], (SEQ,)),
    "upsample_nearest": (lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2,
                                                                scale_factor_width=2),
                         lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (X,)),
    "pad": (lambda x: mb.pad(x=x, pad=[1, 2, 0, 1], mode="constant", constant_val=0.5),
            lambda x: F.pad(x, (0, 1, 1, 2), value=0.5), (X,)),
    "select": (lambda x, y: mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=y),
               lambda x, y: torch.where(x > 0, x, y), (X, X * -3)),
    "cast_fp16": (lambda x: mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"),
                  lambda x: x.half().float(), (X,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_torch(name: str) -> None:
    build, reference, inputs = CASES[name]
    got = _only(_run(build, *inputs))
    expected = reference(*(torch.from_numpy(x) for x in inputs)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_sdpa_ios18_matches_torch() -> None:
    q, k, v = _randn(1, 2, 6, 8), _randn(1, 2, 4, 8), _randn(1, 2, 4, 8)
    mask = _randn(1, 1, 6, 4)
    out = _run(lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v,
                                                                  attn_mask=m),
               q, k, v, mask, opset=ct.target.iOS18)
    expected = F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=T(mask))
    np.testing.assert_allclose(_only(out), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_fp16_program_stores_fp16_like_torch_half() -> None:
    x = _randn(2, 5, 16)
    out = _run(lambda x: mb.cast(x=mb.linear(x=mb.cast(x=x, dtype="fp16"),
                                             weight=LIN_W.astype(np.float16),
                                             bias=LIN_B.astype(np.float16)), dtype="fp32"), x)
    ref = F.linear(T(x).half().float(), T(LIN_W).half().float(), T(LIN_B).half().float())
    np.testing.assert_allclose(_only(out), ref.half().float().numpy(), rtol=2e-3, atol=2e-3)


def _decompressed(op_builder: Callable[[], object], opset: object) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Return (interpreter result, coremltools' own materialized value) of a constexpr op."""
    holder = {}

    def build(x):
        dense = op_builder()
        holder["op"] = dense.op
        dense = dense if dense.dtype == types.fp32 else mb.cast(x=dense, dtype="fp32")
        return mb.add(x=x, y=dense)

    prog = mb.program(input_specs=[mb.TensorSpec(shape=(4, 6), dtype=types.fp32)],
                      opset_version=opset)(build)
    got = _only(run_program(prog, {"x": np.zeros((4, 6), np.float32)}))
    return got, np.asarray(holder["op"].materialized_val_inference(), dtype=np.float32)


def test_lut_to_dense_ios16_unpacks_like_coremltools() -> None:
    from coremltools.optimize._utils import pack_elements_into_bits

    indices = RNG.integers(0, 64, size=24).astype(np.uint8)
    lut = _randn(64).astype(np.float16)
    packed = pack_elements_into_bits(indices, 6)
    got, expected = _decompressed(
        lambda: mb.constexpr_lut_to_dense(indices=packed, lut=lut, shape=np.uint32([4, 6])),
        ct.target.iOS17)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, lut[indices].reshape(4, 6).astype(np.float32))


def test_lut_to_dense_ios18_per_block_tables() -> None:
    indices = RNG.integers(0, 4, size=(4, 6)).astype(types.np_uint2_dtype)
    lut = _randn(2, 1, 4, 1).astype(np.float16)
    got, expected = _decompressed(lambda: mb.constexpr_lut_to_dense(indices=indices, lut=lut),
                                  ct.target.iOS18)
    np.testing.assert_array_equal(got, expected)


def test_affine_dequantize_and_blockwise_shift_scale() -> None:
    data = RNG.integers(-128, 127, size=(4, 6)).astype(np.int8)
    scale = np.abs(_randn(4)).astype(np.float32) + 0.1
    got, expected = _decompressed(
        lambda: mb.constexpr_affine_dequantize(quantized_data=data, zero_point=np.int8(3),
                                               scale=scale[:, None][:, 0], axis=0),
        ct.target.iOS17)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    got, expected = _decompressed(
        lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale[:, None].astype(
            np.float32), offset=np.full((4, 1), 2, np.int8)),
        ct.target.iOS18)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_unsupported_ops_are_all_listed_before_running() -> None:
    prog = mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])(
        lambda x: mb.cumsum(x=mb.argsort(x=x, axis=-1), axis=-1))
    with pytest.raises(UnsupportedOpsError, match="argsort.*cumsum|cumsum.*argsort"):
        run_program(prog, {"x": np.zeros((2, 3), np.float32)})


def test_missing_input_is_named() -> None:
    prog = mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])(lambda x: mb.relu(x=x))
    with pytest.raises(ValueError, match="missing input"):
        run_program(prog, {})


def test_every_case_op_is_supported() -> None:
    assert {"conv", "linear", "softmax", "constexpr_lut_to_dense"} <= set(supported_ops())


def test_round_half_is_numpy_fp16_cast_bit_for_bit() -> None:
    from snapc.targets.coreml_mil_interp import _f32, _round_half

    bits = RNG.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    near = (bits & np.uint32(0x807FFFFF)) | (RNG.integers(98, 146, bits.size).astype(np.uint32)
                                             << 23)  # exponents around fp16's range
    ties = (near & np.uint32(0xFFFFE000)) | np.uint32(0x1000)  # exactly halfway between fp16s
    halfway_subnormal = (np.arange(2**12) * 2.0**-25).astype(np.float32)
    special = np.array([0.0, -0.0, 65504, 65519.99, 65520, -7e4, np.inf, -np.inf, np.nan,
                        2**-25, 3 * 2**-25, 2**-14, -(2**-24)], np.float32)
    for x in (bits.view(np.float32), near.view(np.float32), ties.view(np.float32),
              halfway_subnormal, -halfway_subnormal, special):
        with np.errstate(all="ignore"):
            expected = x.astype(np.float16).astype(np.float32)
        got = _round_half(x.copy())
        same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got)
                                                                     & np.isnan(expected))
        assert same.all(), x[~same][:5]
    half = RNG.standard_normal(1000).astype(np.float16)
    np.testing.assert_array_equal(_f32(half), half.astype(np.float32))


def _attention_program(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[object, list[str]]:
    names = []

    def build(q, k, v):
        q16, k16, v16 = (mb.cast(x=t, dtype="fp16") for t in (q, k, v))
        scores = mb.matmul(x=q16, y=k16, transpose_y=True)
        probs = mb.softmax(x=scores, axis=-1)
        names.extend([scores.name, probs.name])
        return mb.cast(x=mb.matmul(x=probs, y=v16), dtype="fp32")

    specs = [mb.TensorSpec(shape=t.shape) for t in (q, k, v)]
    return mb.program(input_specs=specs, opset_version=ct.target.iOS17)(build), names


def test_fused_attention_equals_the_three_ops_bit_for_bit() -> None:
    q, k, v = _randn(1, 2, 700, 8) * 2, _randn(1, 2, 700, 8) * 2, _randn(1, 2, 700, 8)
    prog, (scores, probs) = _attention_program(q, k, v)
    feeds = dict(zip(prog.functions["main"].inputs, (q, k, v), strict=True))
    fused = run_program(prog, feeds)  # scores and probs read once: fused, in row blocks
    plain = run_program(prog, feeds, keep=[scores, probs])  # kept: three separate ops
    (name,) = fused
    np.testing.assert_array_equal(fused[name], plain[name])
    assert plain[scores].dtype == np.float16 and plain[probs].shape == (1, 2, 700, 700)
    half = [T(t).half().float() for t in (q, k, v)]  # torch, rounding like an fp16 program
    probs_ref = (half[0] @ half[1].transpose(-1, -2)).half().float().softmax(-1).half().float()
    expected = (probs_ref @ half[2]).half().float()
    np.testing.assert_allclose(plain[probs], probs_ref.half().numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(fused[name], expected.numpy(), rtol=0, atol=4e-3)


def test_keep_returns_intermediate_values_and_rejects_unknown_names() -> None:
    prog = mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])(
        lambda x: mb.relu(x=mb.add(x=x, y=1.0, name="shifted")))
    x = _randn(2, 3)
    out = run_program(prog, {"x": x}, keep=["shifted"])
    np.testing.assert_allclose(out["shifted"], x + 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot keep"):
        run_program(prog, {"x": x}, keep=["nope"])


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_unpack_bits_matches_coremltools(nbits: int) -> None:
    from coremltools.optimize._utils import (
        pack_elements_into_bits,
        restore_elements_from_packed_bits,
    )

    from snapc.targets.coreml_mil_interp import _unpack_bits

    for count in (1, 7, 1001):
        values = RNG.integers(0, 2**nbits, size=count).astype(np.uint8)
        packed = pack_elements_into_bits(values, nbits)
        np.testing.assert_array_equal(_unpack_bits(packed, nbits, count), values)
        np.testing.assert_array_equal(
            _unpack_bits(packed, nbits, count),
            restore_elements_from_packed_bits(packed, nbits, count))
