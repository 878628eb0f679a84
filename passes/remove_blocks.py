"""RemoveBlocks: replace named ResNet / transformer blocks by their shortcut path.

A transformer block becomes the identity on its hidden states. A ResNet block becomes its
``conv_shortcut`` (or the identity when it has none), divided by its output scale factor, so
channel-changing blocks in the up stages stay valid. Dead nodes and unused weights are then
dropped and the program is exported again, so the result is a normal, runnable Graph.

Requires: the blocks exist in ``graph.blocks`` and are ``removable``.
Records: one Change per block (rule ``transformer_to_identity``, ``resnet_to_shortcut`` or
``resnet_to_identity``) with nodes removed, params and MACs saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

from snapc.blocks import TRANSFORMER, Block
from snapc.errors import SnapcError, UnknownNameError
from snapc.graph import Graph, drop_unused_attributes, eliminate_dead_code
from snapc.pipeline import Change, PassContext, PassResult, register_pass

__all__ = ["RemoveBlocks", "remove_blocks"]


def _rule(block: Block) -> str:
    if block.kind == TRANSFORMER:
        return "transformer_to_identity"
    return "resnet_to_shortcut" if block.shortcut else "resnet_to_identity"


def _bypass(gm: fx.GraphModule, block: Block, bypassed: dict[fx.Node, fx.Node]) -> None:
    """Rewire ``gm`` so users of the block's exit read its shortcut value instead.

    ``bypassed`` maps exits already rewired to their replacements, so a block whose input is
    the exit of a block removed before it reads that block's replacement.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in (block.exit, block.shortcut or block.hidden_input) if n not in nodes]
    if missing:
        raise SnapcError(f"block {block.name}: nodes {missing} not found in the unlifted graph")
    exit_node = nodes[block.exit]
    replacement = nodes[block.shortcut or block.hidden_input]
    while replacement in bypassed:
        replacement = bypassed[replacement]
    if block.output_scale != 1.0:
        with gm.graph.inserting_after(replacement):
            replacement = gm.graph.call_function(
                torch.ops.aten.div.Tensor, (replacement, block.output_scale))
    exit_node.replace_all_uses_with(replacement)
    bypassed[exit_node] = replacement


def remove_blocks(graph: Graph, names: Iterable[str]) -> tuple[Graph, list[Change]]:
    """Return ``graph`` with the named blocks bypassed and the changes made.

    Names already removed are skipped (no change); unknown or non-removable names raise.
    """
    wanted = [n for n in dict.fromkeys(names) if n not in graph.removed]
    if not wanted:
        return graph, []
    blocks = graph.blocks
    for name in wanted:
        if name not in blocks:
            raise UnknownNameError("block", name, [b.name for b in blocks if b.removable])
        if not blocks[name].removable:
            raise SnapcError(f"block {name} cannot be removed: {blocks[name].reason}")
    gm = graph.edited()
    before_nodes = len(graph.fx.nodes)
    bypassed: dict[fx.Node, fx.Node] = {}
    for name in wanted:
        _bypass(gm, blocks[name], bypassed)
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    new = graph.reexport(gm, removed=graph.removed + tuple(wanted))
    removed_nodes = before_nodes - len(new.fx.nodes)
    changes = []
    for name in wanted:
        block = blocks[name]
        changes.append(Change(
            pass_name=RemoveBlocks.name, rule=_rule(block), target=name,
            removed=len(block.nodes) - (1 if block.shortcut else 0),
            detail={"kind": block.kind, "params": block.params, "macs": block.macs,
                    "graph_nodes_removed": removed_nodes},
        ))
    return new, changes


@register_pass
@dataclass(frozen=True)
class RemoveBlocks:
    """Replace each named block by its shortcut path (transformer -> identity, ResNet ->
    conv_shortcut or identity), then drop dead code and unused weights."""

    names: tuple[str, ...]
    name = "remove_blocks"
    level = 1

    def __init__(self, names: Iterable[str]) -> None:
        object.__setattr__(self, "names", tuple(names))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph without the blocks and one Change per block removed."""
        new, changes = remove_blocks(graph, self.names)
        return PassResult(new, tuple(changes))
