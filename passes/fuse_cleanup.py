"""Cleanups that make fusion patterns visible and graphs smaller: RemoveIdentities, FoldConstants.

``RemoveIdentities`` drops nodes that return their input's value: inference dropout
(``train=False`` or ``p=0``), ``.to`` to the dtype the tensor already has, ``contiguous`` and
plain ``clone``, ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``.

``FoldConstants`` evaluates every node whose inputs are all weights or constants (no graph
input reaches it), stores the result as a new buffer and reads that instead. Random and
uninitialised ops (``empty``, ``rand*``, training dropout) are never folded, and neither is a
result more than twice the size of the constants it reads (a broadcast would inflate the
model).

Records: one Change per removed identity / folded constant, target = its module path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from snapc.graph import Graph
from snapc.passes.fuse_common import add_weight, apply_rules, fetch, tensor_meta, weight_owner
from snapc.passes.rewrite import Hit, Lit, Match, Op, Rule, RuleSet, Val, module_path
from snapc.pipeline import PassContext, PassResult, register_pass

__all__ = ["RemoveIdentities", "FoldConstants", "IDENTITY_RULES"]

aten = torch.ops.aten


def _is(value: object) -> Callable[[object], bool]:
    return lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v == value


def _same_dtype(m: Match) -> str | None:
    val = tensor_meta(m["x"])
    if val is None or val.dtype != m["dtype"]:
        return "changes the dtype"
    return None


def _input(graph: fx.Graph, m: Match, root: fx.Node) -> fx.Node:
    return m["x"]


def _keeps_shape(m: Match) -> str | None:
    x, root = tensor_meta(m["x"]), tensor_meta(m.get("root"))
    if x is None or root is None or x.shape != root.shape or x.dtype != root.dtype:
        return "broadcasts or promotes its input"
    return None


IDENTITY_RULES = RuleSet([
    # dropout(x, p, train=False) -> x
    Rule("remove_dropout", Op(aten.dropout.default, input=Val("x"),
                              train=Lit(lambda t: t is False)), _input),
    # dropout(x, 0, train) -> x
    Rule("remove_dropout", Op(aten.dropout.default, input=Val("x"), p=Lit(_is(0))), _input),
    # x.to(x.dtype) -> x
    Rule("remove_noop_to", Op(aten.to.dtype, input=Val("x"), dtype=Lit(name="dtype"),
                              non_blocking=Lit(lambda b: b is False),
                              copy=Lit(lambda c: c is False)), _input, check=_same_dtype),
    # contiguous(x) -> x, clone(x) -> x
    Rule("remove_contiguous", Op(aten.contiguous.default, input=Val("x")), _input),
    Rule("remove_clone", Op(aten.clone.default, input=Val("x"),
                            memory_format=Lit(lambda f: f is None)), _input),
    # x*1 -> x, x/1 -> x, x+0 -> x, x-0 -> x
    Rule("remove_mul_one", Op(aten.mul.Tensor, name="root", commute=True, input=Val("x"),
                              other=Lit(_is(1))), _input, check=_keeps_shape),
    Rule("remove_div_one", Op(aten.div.Tensor, name="root", input=Val("x"), other=Lit(_is(1))),
         _input, check=_keeps_shape),
    Rule("remove_add_zero", Op(aten.add.Tensor, name="root", commute=True, input=Val("x"),
                               other=Lit(_is(0))), _input, check=_keeps_shape),
    Rule("remove_sub_zero", Op(aten.sub.Tensor, name="root", input=Val("x"), other=Lit(_is(0))),
         _input, check=_keeps_shape),
])


@register_pass
@dataclass(frozen=True)
class RemoveIdentities:
    """Drop dropout at inference, no-op dtype casts, contiguous/clone and x*1, x/1, x+0."""

    name = "remove_identities"
    level = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph without identity nodes."""
        return apply_rules(graph, IDENTITY_RULES, self.name, ctx)


_NEVER_FOLD = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
               aten.rand.default, aten.randn.default, aten.randint.low, aten.rand_like.default,
               aten.randn_like.default, aten.dropout.default, aten.bernoulli.default,
               aten._assert_tensor_metadata.default, aten.lift_fresh_copy.default}


def _foldable(node: fx.Node, const: set[fx.Node]) -> bool:
    if node.op != "call_function" or node.target in _NEVER_FOLD or node.is_impure():
        return False
    inputs = node.all_input_nodes
    return all(n in const for n in inputs)


def _fold_edit(gm: fx.GraphModule) -> list[Hit]:
    graph = gm.graph
    const: set[fx.Node] = {n for n in graph.nodes if n.op == "get_attr"}
    values: dict[fx.Node, object] = {n: fetch(gm, n) for n in const}
    cone: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if not _foldable(node, const):
            continue
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        with torch.no_grad():
            values[node] = node.target(*args, **kwargs)
        const.add(node)
        cone[node] = 1 + sum(cone.get(n, 0) for n in node.all_input_nodes)
    hits = []
    for node in [n for n in graph.nodes if n in cone]:
        value = values[node]
        if not isinstance(value, torch.Tensor) or all(u in const for u in node.users):
            continue
        read = sum(values[n].numel() for n in _const_leaves(node, const)
                   if isinstance(values[n], torch.Tensor))
        if value.numel() > 2 * max(read, 1) and value.numel() > 64:
            continue
        with graph.inserting_before(node):
            folded = add_weight(gm, graph, "snapc_folded", value, buffer=True,
                                owner=weight_owner(gm, _const_leaves(node, const)))
        node.replace_all_uses_with(folded, delete_user_cb=lambda u: u not in const)
        hits.append(Hit("fold_constant", module_path(node), cone[node], folded.name))
    return hits


def _const_leaves(node: fx.Node, const: set[fx.Node]) -> list[fx.Node]:
    seen, stack, leaves = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            leaves.append(n)
        stack.extend(i for i in n.all_input_nodes if i in const)
    return leaves


@register_pass
@dataclass(frozen=True)
class FoldConstants:
    """Evaluate subgraphs that read only weights/constants and store their results."""

    name = "fold_constants"
    level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with constant subgraphs folded into buffers."""
        return apply_rules(graph, (), self.name, ctx, edit=_fold_edit)
