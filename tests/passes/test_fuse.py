"""Fusion passes: positive counts, negative cases, numerics, idempotence, input untouched."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snapc.frontend import trace
from snapc.graph import Graph
from snapc.numerics import verify
from snapc.passes.fuse import DecomposeFusedOps, fusion_passes, lowering_passes
from snapc.passes.fuse_activation import FuseGEGLU, FuseGroupNormSiLU
from snapc.passes.fuse_attention import FoldAttentionHeads, FuseAttention, PackKV, PackQKV
from snapc.passes.fuse_cleanup import FoldConstants, RemoveIdentities
from snapc.pipeline import PassContext, Pipeline
from tests.passes.fusion_models import FORMS, Attention, MiniUNetBlock, mini_inputs

MIN_PSNR_DB = 80.0  # fp32 fusions only reorder float operations (issue 7)


def _graph(module: nn.Module, *inputs: torch.Tensor) -> Graph:
    torch.manual_seed(0)
    return trace(module.eval(), inputs)


def _ops(graph: Graph) -> Counter:
    return Counter(str(n.target) for n in graph.fx.nodes if n.op == "call_function")


def check(graph: Graph, pass_, expected: dict[str, int]) -> Graph:
    """Run ``pass_``: rule counts, modified flag, numerics, idempotence, input untouched."""
    code_before = graph.program.graph_module.code
    result = pass_.run(graph, PassContext())
    assert dict(Counter(c.rule for c in result.changes)) == expected
    assert result.modified == bool(expected)
    assert graph.program.graph_module.code == code_before  # the input graph is not edited
    if expected:
        assert verify(graph, result.graph, graph.example_inputs).psnr_db >= MIN_PSNR_DB
        result.graph.validate()
    assert pass_.run(result.graph, PassContext()).changes == ()  # idempotent
    return result.graph


@pytest.fixture(scope="module")
def classic_block() -> Graph:
    return _graph(MiniUNetBlock(16, 2, 8, 8, form="baddbmm"), *mini_inputs(16, 4, 6, 8))


def test_remove_identities_and_fold_constants(classic_block: Graph) -> None:
    out = check(classic_block, RemoveIdentities(), {"remove_dropout": 1, "remove_noop_to": 2})
    assert "aten.dropout.default" not in _ops(out)
    # baddbmm's scratch tensor is `empty`: never folded; nothing else is constant here
    check(out, FoldConstants(), {})


def test_fold_constants_folds_weight_only_math() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            freqs = torch.exp(torch.arange(8, dtype=torch.float32) * -0.5)
            return x @ (self.w * 2.0).t() + freqs

    out = check(_graph(Scaled(), torch.randn(2, 8)), FoldConstants(), {"fold_constant": 2})
    assert "aten.exp.default" not in _ops(out)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "sdpa"])
def test_fuse_attention_forms(form: str) -> None:
    graph = _graph(MiniUNetBlock(16, 2, 8, 8, form=form), *mini_inputs(16, 4, 6, 8))
    out = check(graph, FuseAttention(), {"fuse_attention": 2})
    assert _ops(out)["aten.scaled_dot_product_attention.default"] == 2
    assert "aten.softmax.int" not in _ops(out)
    check(out, FoldAttentionHeads(), {"fold_attention_heads": 2})


@pytest.mark.parametrize("form", ["baddbmm", "matmul"])
def test_fuse_attention_with_mask(form: str) -> None:
    attn = Attention(8, 8, 2, 4, form)
    mask = torch.zeros(1, 5, 3)
    mask[..., 1] = -1e4
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    mask = mask if form == "baddbmm" else mask[:, None]

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor):
            return self.attn(x, ctx, mask)

    out = check(_graph(Masked(), x, ctx, mask), FuseAttention(), {"fuse_attention": 1})
    check(out, FoldAttentionHeads(), {"fold_attention_heads": 1})


def test_fuse_attention_boolean_masked_fill() -> None:
    class BoolMasked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(4, 4)

        def forward(self, q, k, v, keep):
            scores = (q @ k.transpose(-1, -2)) * 0.5
            return self.out(scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v)

    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keep = torch.tensor([[True, False, True]]).expand(5, 3)
    check(_graph(BoolMasked(), q, k, v, keep), FuseAttention(), {"fuse_attention": 1})


def test_sdpa_left_alone_then_folded() -> None:
    graph = _graph(MiniUNetBlock(16, 2, 8, 8, form="sdpa"), *mini_inputs(16, 4, 6, 8))
    result = FuseAttention().run(graph, PassContext())
    assert result.changes == () and result.info["already_fused"] == 2
    out = check(graph, FoldAttentionHeads(), {"fold_attention_heads": 2})
    out = check(out, PackQKV(), {"pack_qkv": 1})
    check(out, PackKV(), {"pack_kv": 1})


def test_attention_negative_cases() -> None:
    class WrongAxis(nn.Module):  # softmax over the query axis is not attention
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(4, 4)

        def forward(self, q, k, v):
            return self.out((q @ k.transpose(-1, -2)).softmax(dim=-2) @ v)

    class ScoresEscape(WrongAxis):  # the probabilities are an output too: cannot fuse
        def forward(self, q, k, v):
            p = (q @ k.transpose(-1, -2)).softmax(dim=-1)
            return self.out(p @ v + p.sum(-1, keepdim=True))

    qkv = (torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    check(_graph(WrongAxis(), *qkv), FuseAttention(), {})
    check(_graph(ScoresEscape(), *qkv), FuseAttention(), {})


def test_pack_negative_cross_attention_only() -> None:
    graph = _graph(Attention(8, 6, 2, 4, "sdpa"), torch.randn(1, 5, 8), torch.randn(1, 3, 6))
    graph = check(graph, FoldAttentionHeads(), {"fold_attention_heads": 1})
    check(graph, PackQKV(), {})
    check(graph, PackKV(), {"pack_kv": 1})


def test_group_norm_silu_and_geglu(classic_block: Graph) -> None:
    check(classic_block, FuseGroupNormSiLU(), {"fuse_group_norm_silu": 1})
    check(classic_block, FuseGEGLU(), {"fuse_geglu": 1})


def test_group_norm_silu_and_geglu_negative() -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.proj = nn.GroupNorm(2, 8), nn.Linear(8, 16)

        def forward(self, x, t):
            h, g = self.proj(t).chunk(2, dim=-1)
            return F.relu(self.norm(x)), h * F.gelu(g, approximate="tanh")

    graph = _graph(Other(), torch.randn(1, 8, 4, 4), torch.randn(1, 3, 8))
    check(graph, FuseGroupNormSiLU(), {})
    check(graph, FuseGEGLU(), {})


def test_lowering_decomposes_for_tvm(classic_block: Graph) -> None:
    fused = Pipeline(fusion_passes("all")).run(classic_block, PassContext()).graph
    assert any(str(n.target).startswith("snapc.") for n in fused.fx.nodes)
    (decompose,) = lowering_passes("tvm")
    assert isinstance(decompose, DecomposeFusedOps)
    out = check(fused, decompose, {"decompose_attention": 2, "decompose_group_norm_silu": 1,
                                   "decompose_geglu": 1})
    assert not any(str(n.target).startswith("snapc.") for n in out.fx.nodes)
    assert _ops(out)["aten.scaled_dot_product_attention.default"] == 2


def test_fusion_selection_errors() -> None:
    from snapc.errors import UnknownNameError

    assert fusion_passes("none") == []
    assert [p.name for p in fusion_passes("fuse_geglu,pack_qkv")] == ["pack_qkv", "fuse_geglu"]
    with pytest.raises(UnknownNameError, match="valid fusions"):
        fusion_passes("fuse_everything")
