"""A user-written pass (examples/custom_pass.py) composes with the built-in passes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from snapc.numerics import compare
from snapc.passes import RemoveBlocks
from snapc.pipeline import PassContext, Pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_pass.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_pass", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_pass_composes_with_remove_blocks(tiny_graph):
    user = _load_example()
    result = Pipeline([user.drop_dropout, RemoveBlocks(["mid_block.attentions.0"])]).run(
        tiny_graph, PassContext(verify=True))
    first, second = result.records
    assert first.name == "drop_dropout" and len(first.changes) > 0
    assert first.numerics.psnr_db == 200.0  # dropout is an identity at inference
    assert not any(n.target is torch.ops.aten.dropout.default for n in result.graph.fx.nodes)
    assert second.changes[0].target == "mid_block.attentions.0"
    reference = RemoveBlocks(["mid_block.attentions.0"]).run(tiny_graph, PassContext()).graph
    assert compare(reference.run(), result.graph.run()).psnr_db >= 120
    again = user.drop_dropout.run(result.graph, PassContext())
    assert not again.modified and again.graph is result.graph
