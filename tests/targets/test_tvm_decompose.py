"""The TVM import's decomposition: unmasked attention without the safe-softmax guards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snapc.targets.tvm_decompose import decompose_for_tvm

GUARDS = {"aten.eq.Scalar", "aten.any.dim", "aten.logical_not.default", "aten.where.self"}


class Attention(torch.nn.Module):
    def __init__(self, mask: torch.Tensor | None = None, causal: bool = False,
                 scale: float | None = None) -> None:
        super().__init__()
        self.mask, self.causal, self.scale = mask, causal, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask,
                                              is_causal=self.causal, scale=self.scale)


def _ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def _inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))


def test_unmasked_attention_becomes_matmuls_and_a_plain_softmax() -> None:
    inputs = _inputs()
    for scale in (None, 0.3):
        module = Attention(scale=scale)
        program = torch.export.export(module, inputs)
        decomposed = decompose_for_tvm(program)
        ops = _ops(decomposed)
        assert not ops & GUARDS and "aten._softmax.default" in ops, ops
        assert "aten.scaled_dot_product_attention.default" in _ops(program)  # input unchanged
        assert GUARDS <= _ops(program.run_decompositions())  # what PyTorch's table gives
        torch.testing.assert_close(decomposed.module()(*inputs), module(*inputs))


def test_masked_and_causal_attention_keep_pytorchs_decomposition() -> None:
    inputs = _inputs()
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(16, 16, generator=gen) > 0.3
    keep[0] = False  # a fully masked row: the guard's zeros, not NaN
    additive = torch.zeros(16, 16).masked_fill(keep.logical_not(), float("-inf"))
    for module in (Attention(mask=additive), Attention(mask=keep), Attention(causal=True)):
        decomposed = decompose_for_tvm(torch.export.export(module, inputs))
        assert GUARDS <= _ops(decomposed)
        out = decomposed.module()(*inputs)
        torch.testing.assert_close(out, module(*inputs), equal_nan=True)
