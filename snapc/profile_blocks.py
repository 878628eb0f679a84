"""Cut one block out of a graph as a standalone ``fx.GraphModule`` fed tensors of its shapes.

The block's FX nodes are copied, in order, from the unlifted program (``graph.module()``) into a
new graph whose placeholders are the block's entry values (``Block.entry``) and whose output is
its exit. Weights stay ``get_attr`` references to the original module's tensors: nothing is
copied, and the original graph is not changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from snapc.blocks import Block
from snapc.errors import SnapcError
from snapc.graph import Graph, eliminate_dead_code

__all__ = ["IsolatedBlock", "isolate_block", "isolate_blocks", "block_inputs"]


@dataclass(frozen=True)
class IsolatedBlock:
    """A block as a runnable module, with seeded inputs of its real shapes and dtypes."""

    name: str
    module: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]


def block_inputs(graph: Graph, block: Block, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return seeded random tensors with the shapes and dtypes of ``block``'s entry values."""
    nodes = {n.name: n for n in graph.fx.nodes}
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for name, shape in zip(block.entry, block.input_shapes, strict=True):
        val = nodes[name].meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            tensors.append(torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def _cut(unlifted: fx.GraphModule, block: Block) -> fx.GraphModule:
    by_name = {n.name: n for n in unlifted.graph.nodes}
    missing = [n for n in (*block.entry, *block.nodes) if n not in by_name]
    if missing:
        raise SnapcError(f"block {block.name}: nodes {missing[:3]} are not in the unlifted "
                         "graph; re-trace the model")
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name in block.entry:
        placeholder = sub.placeholder(name)
        placeholder.meta = dict(by_name[name].meta)
        env[by_name[name]] = placeholder

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:  # a weight or buffer read by the block
            if node.op != "get_attr":
                raise SnapcError(f"block {block.name}: node {node.name} ({node.op}) enters the "
                                 "block but is not in Block.entry; re-trace the model")
            env[node] = sub.get_attr(node.target)
            env[node].meta = dict(node.meta)
        return env[node]

    for name in block.nodes:
        node = by_name[name]
        env[node] = sub.node_copy(node, arg)
    sub.output(env[by_name[block.exit]])
    module = fx.GraphModule(unlifted, sub, class_name="IsolatedBlock")
    eliminate_dead_code(module)
    module.recompile()
    return module


def isolate_blocks(graph: Graph, names: list[str] | None = None,
                   seed: int = 0) -> list[IsolatedBlock]:
    """Return every block of ``graph`` (or the named ones) as a standalone module with inputs.

    The unlifted program is built once and shared; the original graph is not changed.
    """
    unlifted = graph.module()
    blocks = [graph.blocks[n] for n in names] if names is not None else list(graph.blocks)
    return [IsolatedBlock(b.name, _cut(unlifted, b), block_inputs(graph, b, seed), b.entry)
            for b in blocks]


def isolate_block(graph: Graph, name: str, seed: int = 0) -> IsolatedBlock:
    """Return one block of ``graph`` as a standalone module with inputs of its real shapes."""
    return isolate_blocks(graph, [name], seed)[0]
