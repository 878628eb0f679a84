"""Fast math on the CPU targets (snapc.targets.tvm_fast_math): sigmoid, gelu, softmax and exp
leave their libm calls behind, and the built module still computes what PyTorch computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm", reason="apache-tvm not installed: pip install 'snapc[tvm]'")

from snapc.targets.tvm_build import compile_lowered, import_graph, lower  # noqa: E402

TARGET = tvm.target.Target("llvm")


class Activations(nn.Module):
    """The transcendental functions of a UNet: SiLU (sigmoid), GELU (erf), softmax (exp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (nn.functional.silu(x) + nn.functional.gelu(x)
                + torch.softmax(x, dim=-1) + torch.sigmoid(x))


def _lowered(fast_math: bool):
    program = torch.export.export(Activations().eval(), (torch.randn(4, 64),))
    imported = import_graph(program)
    return imported, lower(imported.module, TARGET, fast_math=fast_math)


def _libm_calls(lowered) -> int:
    text = "\n".join(str(f) for _, f in lowered.module.functions.items()
                     if isinstance(f, tvm.tirx.PrimFunc))
    return text.count("T.exp(") + text.count("T.erf(") + text.count("T.sigmoid(")


def test_fast_math_replaces_the_libm_calls() -> None:
    _, slow = _lowered(fast_math=False)
    _, fast = _lowered(fast_math=True)
    assert "FastActivations" in fast.passes and "FastMathTransform" in fast.passes
    assert "FastActivations" not in slow.passes
    assert _libm_calls(slow) > 0
    assert _libm_calls(fast) == 0


def test_fast_math_computes_what_torch_computes() -> None:
    imported, fast = _lowered(fast_math=True)
    vm = tvm.relax.VirtualMachine(compile_lowered(fast), tvm.cpu(0))
    x = np.random.default_rng(0).standard_normal((4, 64)).astype("float32") * 4
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu(0))).numpy()
    want = Activations()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
