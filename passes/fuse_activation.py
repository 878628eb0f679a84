"""Normalisation and feed-forward fusions: FuseGroupNormSiLU and FuseGEGLU.

- ``silu(group_norm(x))`` (or ``y * sigmoid(y)`` with ``y = group_norm(x)``) becomes
  ``snapc::group_norm_silu``: one pass over the activations instead of two.
- diffusers' GEGLU, ``h, g = linear(x).chunk(2, -1); h * gelu(g)`` with exact GELU, becomes
  ``snapc::geglu``: no chunk copies, bias and GELU in one kernel where the target has one.

Requires: nothing (RemoveIdentities first lets patterns see through no-op ``to``/dropout).
Records: one Change per fused site, target = the module path of the activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapc.graph import Graph
from snapc.passes import fused_ops  # noqa: F401 - registers torch.ops.snapc
from snapc.passes.fuse_common import apply_rules, tensor_meta
from snapc.passes.rewrite import Alt, Item, Lit, Match, Op, Rule, RuleSet, Val, Var
from snapc.pipeline import PassContext, PassResult, register_pass

__all__ = ["FuseGroupNormSiLU", "FuseGEGLU", "GROUP_NORM_SILU_RULES", "GEGLU_RULES"]

aten = torch.ops.aten

_GN = Op(aten.group_norm.default, name="gn", input=Val("x"),
         num_groups=Lit(lambda v: isinstance(v, int), "groups"), weight=Val("weight"),
         bias=Val("bias"), eps=Lit(lambda v: isinstance(v, (int, float)), "eps"))
_GN_SILU = Alt((Op(aten.silu.default, input=_GN),  # silu(gn(x))
                Op(aten.mul.Tensor, commute=True, input=_GN,  # gn(x) * sigmoid(gn(x))
                   other=Op(aten.sigmoid.default, input=_GN))))


def _group_norm_silu(graph, m: Match, root):
    args = (m["x"], m["weight"], m["bias"], m["groups"], float(m["eps"]))
    return graph.call_function(torch.ops.snapc.group_norm_silu.default, args)


GROUP_NORM_SILU_RULES = RuleSet([Rule("fuse_group_norm_silu", _GN_SILU, _group_norm_silu)])

_PROJ = Op(aten.linear.default, input=Val("x"), weight=Val("weight"), bias=Var("bias"))
_CHUNK = Alt((Op(aten.chunk.default, input=_PROJ, chunks=Lit(lambda c: c == 2), dim=Var("dim")),
              Op(aten.split.Tensor, input=_PROJ, split_size=Var("size"), dim=Var("dim"))))
_GEGLU = Op(aten.mul.Tensor, commute=True, input=Item(_CHUNK, 0),  # h * gelu(g)
            other=Op(aten.gelu.default, input=Item(_CHUNK, 1),
                     approximate=Lit(lambda a: a == "none")))


def _last_axis_halves(m: Match) -> str | None:
    val = tensor_meta(m["x"])
    weight = tensor_meta(m["weight"])
    rank = val.dim() if val is not None else 3
    if m["dim"] not in (-1, rank - 1):
        return "chunk is not over the feature axis"
    if weight is not None and "size" in m.values and m["size"] * 2 != weight.shape[0]:
        return "split is not into two halves"
    return None


def _geglu(graph, m: Match, root):
    return graph.call_function(torch.ops.snapc.geglu.default, (m["x"], m["weight"], m["bias"]))


GEGLU_RULES = RuleSet([Rule("fuse_geglu", _GEGLU, _geglu, check=_last_axis_halves)])


@register_pass
@dataclass(frozen=True)
class FuseGroupNormSiLU:
    """Replace silu(group_norm(x)) by snapc::group_norm_silu."""

    name = "fuse_group_norm_silu"
    level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with GroupNorm+SiLU pairs fused."""
        return apply_rules(graph, GROUP_NORM_SILU_RULES, self.name, ctx)


@register_pass
@dataclass(frozen=True)
class FuseGEGLU:
    """Replace linear + chunk + h * gelu(g) by snapc::geglu."""

    name = "fuse_geglu"
    level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with GEGLU projections fused."""
        return apply_rules(graph, GEGLU_RULES, self.name, ctx)
