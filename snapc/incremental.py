"""Evaluate a graph with some blocks bypassed, re-running only what a removal changes.

One reference run caches every value that is live across a block's exit (skip connections,
time embedding, text states, the hidden state itself) plus each block's shortcut inputs. To
score removing block B on top of an already-removed set R, the evaluator starts at B's exit
with those cached values and runs only the nodes after it, bypassing every block in R and B.
That skips the whole upstream part of the UNet, which is where SnapFusion's per-action cost went.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx

from snapc.blocks import Block
from snapc.graph import Graph

__all__ = ["BypassEvaluator"]


class BypassEvaluator:
    """Runs a Graph's FX nodes directly, with chosen blocks replaced by their shortcut.

    ``inputs`` is a batch of calibration inputs (each tensor batched along dim 0). Values are
    computed on ``device`` in ``dtype`` (floating tensors only).
    """

    def __init__(self, graph: Graph, inputs: Sequence[torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.graph = graph
        self.device = torch.device(device)
        self.dtype = dtype
        self.gm = graph.edited().to(self.device)  # trace on `device` (Graph.at_batch) first
        if dtype != torch.float32:
            self.gm = self.gm.to(dtype)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.inputs = tuple(self._cast(t) for t in inputs)
        self.blocks = {b.name: b for b in graph.blocks}
        self._members = {name: {self.by_name[n] for n in b.nodes if n in self.by_name}
                         for name, b in self.blocks.items()}
        self._shortcut_nodes = {name: self._shortcut_path(b) for name, b in self.blocks.items()}
        self._cache: dict[fx.Node, torch.Tensor] = {}
        self._cached_removed: frozenset[str] | None = None

    def _cast(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device)
        return value.to(self.dtype) if value.is_floating_point() else value

    def _shortcut_path(self, block: Block) -> set[fx.Node]:
        """Return the block's nodes that compute its shortcut (conv_shortcut and its inputs)."""
        if not block.shortcut:
            return set()
        members = self._members[block.name]
        path, frontier = set(), [self.by_name[block.shortcut]]
        while frontier:
            node = frontier.pop()
            if node in members and node not in path:
                path.add(node)
                frontier.extend(node.all_input_nodes)
        return path

    def _skip_and_exits(self, removed: Iterable[str]) -> tuple[set[fx.Node], dict[fx.Node, Block]]:
        skip: set[fx.Node] = set()
        exits: dict[fx.Node, Block] = {}
        for name in removed:
            block = self.blocks[name]
            skip |= self._members[name] - self._shortcut_nodes[name]
            exits[self.by_name[block.exit]] = block
        return skip, exits

    def _run(self, removed: frozenset[str], start: int, env: dict[fx.Node, object],
             keep: set[fx.Node] | None, inputs: tuple[torch.Tensor, ...] | None = None
             ) -> torch.Tensor:
        """Execute nodes from position ``start`` and return the graph output."""
        inputs = self.inputs if inputs is None else inputs
        skip, exits = self._skip_and_exits(removed)
        for node in self.nodes[start:]:
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n])
                return out[0] if isinstance(out, (tuple, list)) else out
            if node in exits:
                block = exits[node]
                value = env[self.by_name[block.shortcut or block.hidden_input]]
                env[node] = value / block.output_scale if block.output_scale != 1.0 else value
            elif node in skip:
                continue
            elif node.op == "placeholder":
                env[node] = inputs[self._placeholder_index(node)]
            elif node.op == "get_attr":
                env[node] = _fetch_attr(self.gm, node.target)
            elif node.op == "call_module" and node.target == "_guards_fn":
                env[node] = None  # export's input-shape guards: calibration batches differ
            elif node.op == "call_module":
                args = fx.node.map_arg(node.args, lambda n: env[n])
                env[node] = self.gm.get_submodule(node.target)(*args)
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = node.target(*args, **kwargs)
            if keep is not None and node in keep:
                self._cache[node] = env[node]
        raise RuntimeError("graph has no output node")

    def _placeholder_index(self, node: fx.Node) -> int:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        return placeholders.index(node)

    def _live_across(self, position: int) -> set[fx.Node]:
        """Return nodes computed at or before ``position`` that a later node reads."""
        return {n for n in self.nodes[: position + 1]
                if any(self.position[u] > position for u in n.users)}

    @torch.no_grad()
    def reference(self, removed: Iterable[str] = ()) -> torch.Tensor:
        """Run the full graph with ``removed`` bypassed, cache what later calls need, and
        return the output."""
        removed = frozenset(removed)
        keep: set[fx.Node] = set()
        for block in self.blocks.values():
            if block.name in removed:
                continue
            position = self.position[self.by_name[block.exit]]
            keep |= self._live_across(position)
            keep.add(self.by_name[block.hidden_input])
            keep |= self._shortcut_nodes[block.name]
        self._cache = {}
        out = self._run(removed, 0, {}, keep)
        self._cached_removed = removed
        return out

    @torch.no_grad()
    def with_removed(self, block_name: str) -> torch.Tensor:
        """Return the output with ``block_name`` removed on top of the set given to the last
        :meth:`reference` call, re-running only the nodes after the block's exit."""
        if self._cached_removed is None:
            raise RuntimeError("call reference() first")
        block = self.blocks[block_name]
        exit_node = self.by_name[block.exit]
        position = self.position[exit_node]
        env: dict[fx.Node, object] = {n: v for n, v in self._cache.items()
                                      if self.position[n] <= position}
        source = self.by_name[block.shortcut or block.hidden_input]
        value = self._cache[source]
        env[exit_node] = value / block.output_scale if block.output_scale != 1.0 else value
        return self._run(self._cached_removed | {block_name}, position + 1, env, None)

    @torch.no_grad()
    def full(self, removed: Iterable[str], inputs: Sequence[torch.Tensor] | None = None
             ) -> torch.Tensor:
        """Run the whole graph with ``removed`` bypassed on ``inputs`` (default: the
        evaluator's; same shapes as traced) without caching, and return the output."""
        given = None if inputs is None else tuple(self._cast(t) for t in inputs)
        return self._run(frozenset(removed), 0, {}, None, given)


def _fetch_attr(gm: torch.nn.Module, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
