"""A Graph runs its example inputs once: validation and verification share that output."""

from __future__ import annotations

import pytest
import torch

from snapc.graph import Graph
from snapc.numerics import verify
from snapc.passes import RemoveBlocks
from snapc.pipeline import PassContext, Pipeline


def test_verification_reuses_each_graphs_example_output(tiny_graph, monkeypatch):
    pruned = RemoveBlocks(["mid_block.attentions.0"]).run(tiny_graph, PassContext()).graph
    expected = verify(tiny_graph.module(), pruned.module(), tiny_graph.example_inputs)
    assert tiny_graph.example_output is tiny_graph.example_output  # computed once
    pruned.validate()  # runs the pruned graph once, kept as its example output
    monkeypatch.setattr(Graph, "module", lambda self: pytest.fail("ran a graph again"))
    cached = verify(tiny_graph, pruned, tiny_graph.example_inputs)
    assert cached.psnr_db == expected.psnr_db and cached.max_abs == expected.max_abs
    monkeypatch.undo()
    # other inputs than the graph's own are run, not taken from the cache
    other = tuple(t + 0.5 if t.is_floating_point() else t for t in tiny_graph.example_inputs)
    moved = verify(tiny_graph, pruned, other)
    assert moved.psnr_db != cached.psnr_db


def test_a_pipeline_runs_each_graph_once(tiny_graph, monkeypatch):
    runs = []
    run = Graph.run

    def counting(self, *inputs: torch.Tensor) -> torch.Tensor:
        runs.append(self)
        return run(self, *inputs)

    monkeypatch.setattr(Graph, "run", counting)
    fresh = tiny_graph.with_program(tiny_graph.program)  # no cached output yet
    result = Pipeline([RemoveBlocks(["mid_block.attentions.0"]),
                       RemoveBlocks(["up_blocks.1.attentions.2"])]).run(
        fresh, PassContext(check=True, verify=True))
    assert all(r.numerics is not None for r in result.records)
    # the input once, then each pass's output once (its check and the verification share it)
    assert len(runs) == 3 and len({id(g) for g in runs}) == 3
