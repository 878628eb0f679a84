"""snapc's default CPU schedules (snapc.targets.tvm_cpu_schedule): which kernels each rule takes,
what the schedule looks like, and that it computes what the naive loop nest computes."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'snapc[tvm]'")

from tvm import te, topi  # noqa: E402
from tvm.s_tir import dlight  # noqa: E402

from snapc.targets.tvm_cpu_schedule import (  # noqa: E402
    Contraction,
    Elementwise,
    VectorReduction,
    cpu_rules,
)

TARGET = tvm.target.Target("llvm")


def _conv_bias() -> tvm.tirx.PrimFunc:
    """A padded 3x3 convolution plus a bias: the UNet's commonest kernel."""
    data = te.placeholder((2, 8, 16, 16), name="data")
    weight = te.placeholder((12, 8, 3, 3), name="weight")
    bias = te.placeholder((1, 12, 1, 1), name="bias")
    out = topi.add(topi.nn.conv2d_nchw(data, weight, 1, 1, 1), bias)
    return te.create_prim_func([data, weight, bias, out])


def _batch_matmul() -> tvm.tirx.PrimFunc:
    a = te.placeholder((4, 32, 20), name="a")
    b = te.placeholder((4, 20, 24), name="b")
    k = te.reduce_axis((0, 20), name="k")
    out = te.compute((4, 32, 24), lambda n, i, j: te.sum(a[n, i, k] * b[n, k, j], axis=k))
    return te.create_prim_func([a, b, out])


def _softmax() -> tvm.tirx.PrimFunc:
    x = te.placeholder((8, 64), name="x")
    return te.create_prim_func([x, topi.nn.softmax(x)])


def _group_norm() -> tvm.tirx.PrimFunc:
    """GroupNorm over (channels of a group, H, W): a two-output (sum, sum of squares) row
    reduction."""
    x = te.placeholder((2, 16, 8, 8), name="x")
    gamma, beta = te.placeholder((16,), name="gamma"), te.placeholder((16,), name="beta")
    out = topi.nn.group_norm(x, gamma, beta, 4, 1, [2, 3], 1e-5)
    return te.create_prim_func([x, gamma, beta, out])


def _layer_norm() -> tvm.tirx.PrimFunc:
    x = te.placeholder((2, 12, 64), name="x")
    gamma, beta = te.placeholder((64,), name="gamma"), te.placeholder((64,), name="beta")
    return te.create_prim_func([x, gamma, beta, topi.nn.layer_norm(x, gamma, beta, [2], 1e-5)])


def _transpose() -> tvm.tirx.PrimFunc:
    x = te.placeholder((4, 16, 32), name="x")
    return te.create_prim_func([x, topi.transpose(x, (0, 2, 1))])


def _schedule(func: tvm.tirx.PrimFunc, rules=None) -> tvm.tirx.PrimFunc:
    mod = tvm.IRModule({"main": func})
    with TARGET:
        return dlight.ApplyDefaultSchedule(*(rules or cpu_rules()))(mod)["main"]


def _run(func: tvm.tirx.PrimFunc, arrays: list[np.ndarray]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=TARGET).jit()
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _inputs(shapes: list[tuple[int, ...]], out: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype("float32") for s in shapes] + [
        np.zeros(out, "float32")]


def test_contraction_takes_conv_and_matmul_but_not_softmax_or_copies() -> None:
    rule = Contraction()
    assert rule.apply(_conv_bias(), TARGET, False) is not None
    assert rule.apply(_batch_matmul(), TARGET, False) is not None
    assert rule.apply(_softmax(), TARGET, False) is None  # VectorReduction's
    assert rule.apply(_transpose(), TARGET, False) is None
    assert Elementwise().apply(_transpose(), TARGET, False) is not None


def test_vector_reduction_takes_row_reductions_but_not_matmuls() -> None:
    rule = VectorReduction()
    for make in (_softmax, _layer_norm, _group_norm):
        assert rule.apply(make(), TARGET, False) is not None, make.__name__
    assert rule.apply(_batch_matmul(), TARGET, False) is None  # each operand misses an axis
    assert rule.apply(_transpose(), TARGET, False) is None


@pytest.mark.parametrize("make", [_softmax, _layer_norm, _group_norm])
def test_row_reductions_keep_vector_partials_in_registers(make) -> None:
    script = _schedule(make()).script()
    assert "_rf_init" in script and "_rf_update" in script  # rfactor: lanes of partials
    assert 'scope="local"' in script and "T.parallel(" in script
    update = script.split("_rf_update")[1].split("T.sblock(")[0]
    assert "T.unroll(" not in update  # the unrolled lane loop is the block's innermost...
    assert "T.unroll(" in script.split("_rf_update")[0].rsplit("for ", 1)[1]  # ...loop


@pytest.mark.parametrize("target, lanes", [
    ({"kind": "llvm", "mcpu": "x86-64"}, 4), ({"kind": "llvm", "mcpu": "haswell"}, 8),
    ({"kind": "llvm", "mcpu": "znver4"}, 16),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4),
])
def test_vector_lanes_are_the_targets_not_this_hosts(target, lanes) -> None:
    from snapc.targets.tvm_cpu_schedule import _lanes

    assert _lanes(tvm.target.Target(target)) == lanes


def _conv16() -> tvm.tirx.PrimFunc:
    data = te.placeholder((2, 8, 16, 16), name="data")
    weight = te.placeholder((16, 8, 3, 3), name="weight")
    return te.create_prim_func([data, weight, topi.nn.conv2d_nchw(data, weight, 1, 1, 1)])


@pytest.mark.parametrize("mcpu, rows", [("znver4", 8), ("haswell", 4), ("x86-64", 4)])
def test_register_tile_takes_8_rows_only_with_avx512(mcpu, rows) -> None:
    """Scheduling only (nothing runs): 16 output channels (the rows), 16 columns."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    with target:
        script = dlight.ApplyDefaultSchedule(*cpu_rules())(
            tvm.IRModule({"main": _conv16()}))["main"].script()
    unrolled = set(re.findall(r"T\.unroll\((?:T\.int64\()?(\d+)", script))
    assert unrolled == {str(rows), "16"}


def test_conv_schedule_is_parallel_register_tiled_and_padding_stays_apart() -> None:
    script = _schedule(_conv_bias()).script()
    assert '"tirx.is_scheduled": True' in script
    assert "T.parallel(" in script and "T.vectorized(" in script and "T.unroll(" in script
    assert 'scope="local"' in script  # the accumulator tile
    assert 'T.sblock("pad_temp")' in script  # materialized: no branch in the inner loop
    assert "if_then_else" not in script.split('T.sblock("conv2d_nchw_update")')[1]


@pytest.mark.parametrize("make, shapes, out", [
    (_conv_bias, [(2, 8, 16, 16), (12, 8, 3, 3), (1, 12, 1, 1)], (2, 12, 16, 16)),
    (_batch_matmul, [(4, 32, 20), (4, 20, 24)], (4, 32, 24)),
    (_softmax, [(8, 64)], (8, 64)),
    (_layer_norm, [(2, 12, 64), (64,), (64,)], (2, 12, 64)),
    (_group_norm, [(2, 16, 8, 8), (16,), (16,)], (2, 16, 8, 8)),
    (_transpose, [(4, 16, 32)], (4, 32, 16)),
])
def test_scheduled_kernels_compute_what_the_naive_nest_computes(make, shapes, out) -> None:
    func = make()
    naive = _run(func, _inputs(shapes, out))
    scheduled = _run(_schedule(func), _inputs(shapes, out))
    np.testing.assert_allclose(scheduled, naive, rtol=1e-5, atol=1e-5)
    assert np.abs(naive).max() > 0  # the kernel wrote something


def test_cpu_schedules_switch(tmp_path) -> None:
    from snapc.compiler import load_graph
    from snapc.targets.tvm_build import count_scheduled, import_graph, lower

    imported = import_graph(load_graph("tiny").program)
    on = lower(imported.module, TARGET)
    off = lower(imported.module, TARGET, cpu_schedules=False)
    assert "ApplyDefaultSchedule" in on.passes and "ApplyDefaultSchedule" not in off.passes
    assert count_scheduled(on.module) > 0 and count_scheduled(off.module) == 0
