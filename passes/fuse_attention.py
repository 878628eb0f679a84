"""Attention fusions: FuseAttention, FoldAttentionHeads, PackQKV, PackKV.

``FuseAttention`` turns the unfused attention forms into one
``aten.scaled_dot_product_attention`` node (the standard fused op every target knows):

- ``softmax(baddbmm(bias, q, k^T, beta, alpha)) @ v`` (diffusers ``AttnProcessor``:
  beta=0 without a mask, beta=1 with the mask as ``bias``),
- ``softmax((q @ k^T) * s [+ mask]) @ v`` with ``bmm`` or ``matmul``, the scale as ``* s``,
  ``/ d``, on ``q`` before the product, or absent (scale 1), the mask added after scaling,
- the same with ``masked_fill(mask, -inf)`` (boolean mask, True = masked out).

``k^T`` may be any tensor: a ``transpose(k, -1, -2)`` is looked through, anything else is
transposed back. A softmax upcast (``.to(dtype)``) between softmax and the second product is
allowed. Graphs that already call ``scaled_dot_product_attention`` are left alone (counted in
``PassResult.info["already_fused"]``).

``FoldAttentionHeads`` turns SDPA between a head split of (B, S, heads*dh) tensors and the
matching head merge (diffusers' two spellings, or any view/permute chain with the same
effect, checked by running the chain on an index tensor) into ``snapc::attention`` on the
(B, S, D) tensors: the layout onnxruntime's MultiHeadAttention, Core ML's split-einsum form
and TVM's ``R.nn.attention`` start from.

``PackQKV``: when q, k and v of one ``snapc::attention`` are ``linear`` projections of the
same tensor, one linear with the concatenated weight replaces them, then a split.
``PackKV``: the same for k and v only (cross-attention, where q reads another tensor).

Requires: FoldAttentionHeads after FuseAttention; PackQKV/PackKV after FoldAttentionHeads.
Records: one Change per fused attention / folded layout / packed projection set, target =
the attention module path (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from snapc.graph import Graph
from snapc.passes import fused_ops  # noqa: F401 - registers torch.ops.snapc
from snapc.passes.fuse_common import add_weight, apply_rules, fetch, tensor_meta, weight_owner
from snapc.passes.rewrite import (
    META_KEYS,
    Alt,
    Hit,
    Lit,
    Match,
    Op,
    Pat,
    Rule,
    RuleSet,
    Val,
    Var,
    maybe,
    module_path,
)
from snapc.pipeline import PassContext, PassResult, register_pass

__all__ = ["FuseAttention", "FoldAttentionHeads", "PackQKV", "PackKV", "ATTENTION_RULES",
           "count_sdpa"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SNAPC_ATTENTION = torch.ops.snapc.attention.default
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_LAYOUT = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
           aten.permute.default, aten.transpose.int, aten.contiguous.default,
           aten.clone.default, aten.unflatten.int, aten.flatten.using_ints)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scores(q: Pat) -> Pat:
    return Alt((Op(aten.bmm.default, input=q, mat2=Val("kt")),
                Op(aten.matmul.default, input=q, other=Val("kt"))))


_Q = Alt((Op(aten.mul.Tensor, commute=True, input=Val("q"), other=Lit(_number, "q_scale")),
          Val("q")))
_QK = _scores(_Q)
_SCALED = Alt((Op(aten.mul.Tensor, commute=True, input=_QK, other=Lit(_number, "scale")),
               Op(aten.div.Tensor, input=_QK, other=Lit(_number, "divisor")),
               _QK))
_MASKED = Alt((Op(aten.add.Tensor, commute=True, input=_SCALED, other=Val("mask")),
               Op(aten.masked_fill.Scalar, input=_SCALED, mask=Val("bool_mask"),
                  value=Lit(lambda v: v == -math.inf or v <= -1e30)),
               _SCALED))
_BADDBMM = Op(aten.baddbmm.default, input=Var("bias_in"), batch1=_Q, batch2=Val("kt"),
              beta=Lit(_number, "beta"), alpha=Lit(_number, "alpha"))
_PROBS = maybe(aten.to.dtype, Op(_SOFTMAX, input=Alt((_BADDBMM, _MASKED)), dim=Var("dim")))
_PROBS = maybe(aten.dropout.default, _PROBS)
_ATTENTION = Alt((Op(aten.bmm.default, input=_PROBS, mat2=Val("v")),
                  Op(aten.matmul.default, input=_PROBS, other=Val("v"))))


def _last_dim_softmax(m: Match) -> str | None:
    val = tensor_meta(m["q"])
    rank = val.dim() if val is not None else 3
    if m["dim"] not in (-1, rank - 1):
        return f"softmax over dim {m['dim']}, not the key axis"
    if val is not None and val.dim() < 3:
        return "q has no batch axis"
    return None


def _scale(m: Match) -> float:
    scale = float(m.get("q_scale", 1.0)) * float(m.get("scale", 1.0)) * float(m.get("alpha", 1.0))
    return scale / float(m.get("divisor", 1.0))


def _keys(graph: fx.Graph, kt: fx.Node) -> fx.Node:
    """Return k for ``kt = k^T``: look through a last-two-axes transpose, else transpose."""
    val = tensor_meta(kt)
    rank = val.dim() if val is not None else 3
    if kt.target == aten.transpose.int and {d % rank for d in kt.args[1:3]} == {rank - 2,
                                                                               rank - 1}:
        return kt.args[0]
    return graph.call_function(aten.transpose.int, (kt, -2, -1))


def _fused_attention(graph: fx.Graph, m: Match, root: fx.Node) -> fx.Node | None:
    mask = m.get("mask")
    if "bias_in" in m.values and m["beta"] != 0:  # baddbmm with a mask: beta * mask + scores
        mask = m["bias_in"]
        if m["beta"] != 1:
            mask = graph.call_function(aten.mul.Tensor, (mask, m["beta"]))
    if "bool_mask" in m.values:
        mask = graph.call_function(aten.logical_not.default, (m["bool_mask"],))
    kwargs = {"attn_mask": mask, "scale": _scale(m)}
    return graph.call_function(SDPA, (m["q"], _keys(graph, m["kt"]), m["v"]), kwargs)


ATTENTION_RULES = RuleSet([Rule("fuse_attention", _ATTENTION, _fused_attention,
                                check=_last_dim_softmax)])


def count_sdpa(graph: Graph) -> int:
    """Return how many scaled_dot_product_attention nodes ``graph`` already has."""
    return sum(1 for n in graph.fx.nodes if n.target == SDPA)


@register_pass
@dataclass(frozen=True)
class FuseAttention:
    """Replace unfused attention (bmm/baddbmm/matmul + softmax + bmm/matmul, with or without
    masks) by one scaled_dot_product_attention; leave existing SDPA alone."""

    name = "fuse_attention"
    level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the fused graph; info["already_fused"] counts SDPA present before."""
        before = count_sdpa(graph)
        result = apply_rules(graph, ATTENTION_RULES, self.name, ctx)
        return PassResult(result.graph, result.changes,
                          {**result.info, "already_fused": before})


# --- FoldAttentionHeads -----------------------------------------------------------------


def _layout_chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up from ``node`` through single-user layout ops; return (source, chain)."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node) and node.target in _LAYOUT:
        chain.append(node)
        node = node.args[0]
        if len([u for u in node.users if u.target != aten._assert_tensor_metadata.default]) > 1:
            break
    return node, chain[::-1]


def _replay(chain: list[fx.Node], value: torch.Tensor) -> torch.Tensor | None:
    """Run the layout ops of ``chain`` on ``value``; None when they do not apply."""
    try:
        for node in chain:
            value = node.target(value, *node.args[1:], **node.kwargs)
    except (RuntimeError, TypeError, IndexError):
        return None
    return value


def _split_heads(x: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    b, s, d = x.shape
    split = x.reshape(b, s, heads, d // heads).transpose(1, 2)
    return split if rank == 4 else split.reshape(b * heads, s, d // heads)


def _is_head_split(source: fx.Node, chain: list[fx.Node], heads: int, rank: int) -> bool:
    val = tensor_meta(source)
    if val is None or val.dim() != 3 or val.shape[-1] % heads:
        return False
    index = torch.arange(val.numel()).reshape(val.shape)
    out = _replay(chain, index)
    expected = _split_heads(index, heads, rank)
    return out is not None and out.shape == expected.shape and bool((out == expected).all())


def _is_head_merge(chain: list[fx.Node], sdpa_val: torch.Tensor, batch: int) -> bool:
    index = torch.arange(sdpa_val.numel()).reshape(sdpa_val.shape)
    out = _replay(chain, index)
    if sdpa_val.dim() == 3:
        index = index.reshape(batch, -1, *index.shape[1:])
    expected = index.transpose(1, 2).reshape(batch, index.shape[2], -1)
    return out is not None and out.shape == expected.shape and bool((out == expected).all())


@dataclass(frozen=True)
class _HeadMerge(Pat):
    """The end of a head merge after SDPA whose q/k/v are head splits of (B, S, D) tensors."""

    def match(self, value: object, m: Match) -> bool:
        if not isinstance(value, fx.Node) or value.target not in _LAYOUT:
            return False
        sdpa, merge = _layout_chain(value)
        if not isinstance(sdpa, fx.Node) or sdpa.target != SDPA or not merge:
            return False
        kw = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
                      sdpa.args, strict=False)) | dict(sdpa.kwargs)
        if kw.get("dropout_p", 0.0) or kw.get("is_causal") or kw.get("enable_gqa"):
            return False
        out_val, q_val = tensor_meta(sdpa), tensor_meta(kw["query"])
        if out_val is None or q_val is None:
            return False
        sources, chains = [], []
        for operand in (kw["query"], kw["key"], kw["value"]):
            source, chain = _layout_chain(operand)
            sources.append(source)
            chains.append(chain)
        src_val = tensor_meta(sources[0])
        if src_val is None or src_val.dim() != 3:
            return False
        batch = src_val.shape[0]
        heads = q_val.shape[1] if q_val.dim() == 4 else q_val.shape[0] // batch
        if not all(_is_head_split(s, c, heads, q_val.dim()) for s, c in zip(sources, chains,
                                                                           strict=True)):
            return False
        if not _is_head_merge(merge, out_val, batch):
            return False
        m.values.update(q=sources[0], k=sources[1], v=sources[2], heads=int(heads),
                        scale=kw.get("scale"), mask=kw.get("attn_mask"), sdpa=sdpa,
                        batch=int(batch), rank=q_val.dim(), head_dim=int(q_val.shape[-1]))
        m.nodes.extend([n for c in chains for n in c] + [sdpa] + merge)
        return True


def _mask_4d(graph: fx.Graph, m: Match) -> fx.Node | None:
    """Return the additive mask as (B or 1, heads or 1, S, L), or None without a mask."""
    mask = m["mask"]
    if mask is None:
        return None
    val = tensor_meta(mask)
    if val is not None and val.dtype == torch.bool:
        zero = graph.call_function(aten.zeros_like.default, (mask,), {"dtype": torch.float32})
        mask = graph.call_function(aten.masked_fill.Scalar,
                                   (zero, graph.call_function(aten.logical_not.default, (mask,)),
                                    float("-inf")))
    if m["rank"] == 3 and val is not None and val.dim() == 3 and val.shape[0] > 1:
        return graph.call_function(aten.reshape.default,
                                   (mask, [m["batch"], m["heads"], *val.shape[1:]]))
    rank = val.dim() if val is not None else 4
    for _ in range(4 - rank):
        mask = graph.call_function(aten.unsqueeze.default, (mask, 0))
    return mask


def _folded_attention(graph: fx.Graph, m: Match, root: fx.Node) -> fx.Node:
    scale = m["scale"] if m["scale"] is not None else m["head_dim"] ** -0.5
    args = (m["q"], m["k"], m["v"], m["heads"], float(scale), _mask_4d(graph, m))
    return graph.call_function(SNAPC_ATTENTION, args)


HEAD_RULES = RuleSet([Rule("fold_attention_heads", _HeadMerge(), _folded_attention)])


@register_pass
@dataclass(frozen=True)
class FoldAttentionHeads:
    """Replace head split + SDPA + head merge by snapc::attention on (B, S, D) tensors."""

    name = "fold_attention_heads"
    level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with every foldable SDPA as snapc::attention."""
        return apply_rules(graph, HEAD_RULES, self.name, ctx)


# --- PackQKV / PackKV -------------------------------------------------------------------


def _projection(node: object, gm: fx.GraphModule) -> tuple[fx.Node, torch.Tensor,
                                                          torch.Tensor | None] | None:
    """Return (input, weight, bias) when ``node`` is a single-use linear with constant weights."""
    if not isinstance(node, fx.Node) or node.target != aten.linear.default or len(node.users) != 1:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    weight = fetch(gm, args[1])
    bias = fetch(gm, args[2]) if isinstance(args[2], fx.Node) else None
    if weight is None or (isinstance(args[2], fx.Node) and bias is None):
        return None
    return args[0], weight, bias


def _packed(gm: fx.GraphModule, graph: fx.Graph, x: fx.Node,
            parts: list[tuple[torch.Tensor, torch.Tensor | None]], owner: str) -> list[fx.Node]:
    """Emit one linear over the concatenated weights of ``parts`` and its split outputs; the
    packed weights are registered in the module ``owner`` (the attention module)."""
    weight = torch.cat([w for w, _ in parts])
    biases = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for w, b in parts]
    has_bias = any(b is not None for _, b in parts)
    args = [x, add_weight(gm, graph, "snapc_packed_weight", weight, owner=owner)]
    if has_bias:
        args.append(add_weight(gm, graph, "snapc_packed_bias", torch.cat(biases), owner=owner))
    packed = graph.call_function(aten.linear.default, tuple(args))
    sizes = [int(w.shape[0]) for w, _ in parts]
    split = graph.call_function(aten.split_with_sizes.default, (packed, sizes, -1))
    return [graph.call_function(operator.getitem, (split, i)) for i in range(len(parts))]


def _pack_edit(gm: fx.GraphModule, with_query: bool) -> list[Hit]:
    rule_name = "pack_qkv" if with_query else "pack_kv"
    hits = []
    for node in list(gm.graph.nodes):
        if node.target != SNAPC_ATTENTION:
            continue
        q, k, v = (_projection(a, gm) for a in node.args[:3])
        if k is None or v is None or k[0] is not v[0] or node.args[1] is node.args[2]:
            continue
        self_attention = q is not None and q[0] is k[0]
        if self_attention != with_query:
            continue
        members = [q, k, v] if with_query else [k, v]
        olds = list(node.args[:3]) if with_query else list(node.args[1:3])
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        owner = weight_owner(gm, [old.args[1] for old in olds])
        before = set(gm.graph.nodes)
        with gm.graph.inserting_before(min(olds, key=order.__getitem__)):
            outs = _packed(gm, gm.graph, k[0], [(w, b) for _, w, b in members], owner)
        # The packed linear, its split and the split's outputs belong to the attention module
        # (the one that owns the packed weights), not to the top level: a node without a
        # module stack cuts the module out of the program's module tree when unflattened.
        for added in gm.graph.nodes:
            if added not in before and added.op == "call_function":
                added.meta.update({key: node.meta[key] for key in META_KEYS if key in node.meta})
        for old, new in zip(olds, outs, strict=True):
            old.replace_all_uses_with(new)
            gm.graph.erase_node(old)
        hits.append(Hit(rule_name, module_path(node), len(members), node.name))
    gm.graph.lint()
    gm.recompile()
    return hits


@register_pass
@dataclass(frozen=True)
class PackQKV:
    """Pack the q, k, v projections of one input (self-attention) into one linear."""

    name = "pack_qkv"
    level = 2

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with packed self-attention projections."""
        return apply_rules(graph, (), self.name, ctx, edit=lambda gm: _pack_edit(gm, True))


@register_pass
@dataclass(frozen=True)
class PackKV:
    """Pack the k, v projections of the context (cross-attention) into one linear."""

    name = "pack_kv"
    level = 2

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with packed cross-attention projections."""
        return apply_rules(graph, (), self.name, ctx, edit=lambda gm: _pack_edit(gm, False))
