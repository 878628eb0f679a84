"""AneAttentionLayout: split-einsum channels-first attention, query chunks, conv projections."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from snapc.frontend import trace
from snapc.graph import Graph
from snapc.passes.ane_layout import AneAttentionLayout, split_einsum_attention
from snapc.passes.fuse import fusion_passes, lowering_passes
from snapc.passes.fused_ops import attention_reference
from snapc.pipeline import PassContext, Pipeline
from tests.passes.fusion_models import MiniUNetBlock, mini_inputs
from tests.passes.test_fuse import check


@pytest.fixture(scope="module")
def fused_block() -> Graph:
    torch.manual_seed(0)
    graph = trace(MiniUNetBlock(16, 2, 8, 8, form="baddbmm").eval(), mini_inputs(16, 6, 5, 8))
    return Pipeline(fusion_passes("all")).run(graph, PassContext()).graph


@pytest.mark.parametrize("chunk", [512, 7])
def test_ane_layout_rewrites_every_attention(fused_block: Graph, chunk: int) -> None:
    out = check(fused_block, AneAttentionLayout(chunk=chunk), {"ane_split_einsum": 2})
    result = AneAttentionLayout(chunk=chunk).run(fused_block, PassContext())
    details = [c.detail for c in result.changes]
    assert [d["query_chunks"] for d in details] == [1 if chunk == 512 else 6] * 2  # 36 tokens
    # self-attention: packed qkv conv + to_out conv; cross: q conv, packed kv conv, to_out conv
    assert [d["conv_projections"] for d in details] == [2, 3]
    ops = Counter(str(n.target) for n in out.fx.nodes if n.op == "call_function")
    assert ops["aten.einsum.default"] == 2 * 2 * 2 * (1 if chunk == 512 else 6)
    assert "snapc.attention.default" not in ops


def test_coreml_lowering_leaves_no_custom_ops(fused_block: Graph) -> None:
    graph = Pipeline(lowering_passes("coreml")).run(fused_block, PassContext()).graph
    assert not any(str(n.target).startswith("snapc.") for n in graph.fx.nodes)


def test_split_einsum_matches_reference_with_mask() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 12, generator=gen) for n in (9, 4, 4))
    bias = torch.randn(2, 3, 9, 4, generator=gen)
    expected = attention_reference(q, k, v, 3, 0.3, bias)
    cf = [t.transpose(1, 2).unsqueeze(2) for t in (q, k, v)]
    got = split_einsum_attention(*cf, 3, 0.3, bias, chunk=4).squeeze(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_chunk_is_rejected(fused_block: Graph) -> None:
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        AneAttentionLayout(chunk=0).run(fused_block, PassContext())
