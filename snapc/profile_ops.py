"""Cut single ops out of a graph's blocks as standalone modules, one per distinct op shape.

Block timings alone often cannot tell the op classes apart: every transformer block of a
model runs the same mix of GEMMs, attention, norms and element-wise ops, so a fit to block
totals can trade one class's cost for another's. Timing each distinct op (same target, input
shapes, dtypes and constant arguments) in isolation gives the fit one equation per op class
and size (``snapc profile --ops``, ``snapc.cost.fitting``).

Each op is copied from the unlifted program (``graph.module()``) into a one-node graph whose
placeholders are its tensor inputs; weights stay ``get_attr`` references (nothing is copied)
and the original graph is not changed. Views and no-op casts are skipped: they launch no
kernel of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import fx

from snapc.cost.model import quantized_inputs
from snapc.cost.work import VIEW, NodeWork, node_work
from snapc.graph import Graph, eliminate_dead_code

__all__ = ["IsolatedOp", "isolate_ops", "op_key"]


@dataclass(frozen=True)
class IsolatedOp:
    """One distinct op as a runnable module with seeded inputs of its real shapes.

    ``key`` identifies the op shape (target, input shapes and dtypes, constant arguments);
    ``node`` is the first node with that key; ``blocks`` every block that runs it and
    ``count`` how many times it occurs in them.
    """

    key: str
    target: str
    node: str
    blocks: tuple[str, ...]
    count: int
    work: NodeWork
    module: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]


def _constant(value: object) -> object:
    """Return a JSON-able stand-in for a non-tensor argument (nodes become their shape)."""
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        return list(val.shape) if isinstance(val, torch.Tensor) else value.op
    if isinstance(value, (list, tuple)):
        return [_constant(v) for v in value]
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return str(value)


def op_key(node: fx.Node) -> str | None:
    """Return the key of ``node``'s op shape: target, input shapes and dtypes and constant
    arguments as canonical JSON; None when an input is not a tensor (a symbolic size)."""
    inputs = []
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        inputs.append([list(val.shape), str(val.dtype).replace("torch.", "")])
    payload = {"target": str(node.target), "inputs": inputs,
               "args": _constant(node.args), "kwargs": _constant(dict(node.kwargs))}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _cut_op(unlifted: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            env[arg] = sub.get_attr(arg.target)
        else:
            env[arg] = sub.placeholder(arg.name)
        env[arg].meta = dict(arg.meta)
    copied = sub.node_copy(node, lambda arg: env[arg])
    sub.output(copied)
    module = fx.GraphModule(unlifted, sub, class_name="IsolatedOp")
    eliminate_dead_code(module)
    module.recompile()
    return module


def _inputs(node: fx.Node, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    tensors = []
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            continue
        val = arg.meta["val"]
        if val.dtype.is_floating_point:
            tensors.append(torch.randn(tuple(val.shape), generator=gen).to(val.dtype))
        else:
            tensors.append(torch.zeros(tuple(val.shape), dtype=val.dtype))
    return tuple(tensors)


def isolate_ops(graph: Graph, names: list[str] | None = None,
                seed: int = 0) -> list[IsolatedOp]:
    """Return one standalone module per distinct op shape in ``graph``'s blocks (or the named
    blocks), in graph order, skipping views, no-op casts and ops with non-tensor inputs."""
    unlifted = graph.module()
    by_name = {n.name: n for n in unlifted.graph.nodes}
    traced = {n.name: n for n in graph.fx.nodes}
    bits, int8 = quantized_inputs(graph)
    blocks = [graph.blocks[n] for n in names] if names is not None else list(graph.blocks)
    found: dict[str, dict] = {}
    for block in blocks:
        for name in block.nodes:
            node = by_name.get(name)
            work = node_work(traced[name], None, bits, int8) if name in traced else None
            if node is None or work is None or work.op_class == VIEW or not work.launches:
                continue
            key = op_key(node)
            if key is None:
                continue
            site = found.setdefault(key, {"node": node, "work": work, "blocks": [],
                                          "count": 0})
            site["count"] += 1
            if block.name not in site["blocks"]:
                site["blocks"].append(block.name)
    gen = torch.Generator().manual_seed(seed)
    return [IsolatedOp(key, str(s["node"].target), s["node"].name, tuple(s["blocks"]),
                       s["count"], s["work"], _cut_op(unlifted, s["node"]),
                       _inputs(s["node"], gen))
            for key, s in found.items()]
