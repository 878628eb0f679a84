"""Neural Engine attention layout (Apple's SPLIT_EINSUM_V2 form) as a lowering pass.

The Apple Neural Engine works on channels-first 4-D tensors and runs 1x1 convolutions far
better than batched matmuls on (B, S, D) tensors. For every ``snapc::attention`` node this
pass emits:

- its q/k/v projections as 1x1 ``conv2d`` on the channels-first (B, C, 1, S) input (a
  ``linear`` becomes a conv with the weight reshaped to (out, in, 1, 1); packed projections
  become one conv and a channel split),
- attention split per head along the channel axis, each head as two ``einsum``s
  (``bchq,bchk->bkhq`` for scores, softmax over the key axis 1, ``bkhq,bchk->bchq``), with
  the queries cut into chunks of ``chunk`` tokens (512 in Apple's SPLIT_EINSUM_V2, 10-30%
  faster on iPhones; see bench notes) so no score tensor exceeds (B, L, 1, chunk) per head,
- the output projection (when the attention feeds one ``linear``) as a 1x1 conv too,

and one transpose back to (B, S, D) at the end. Numerics are unchanged (checked, >= 80 dB).

Requires: FoldAttentionHeads (and optionally PackQKV/PackKV) before it; run it only for the
Core ML target, then DecomposeFusedOps for the remaining snapc ops.
Records: one Change per attention (rule ``ane_split_einsum``) with heads, query chunks and
the number of projections turned into convolutions.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from snapc.graph import Graph, eliminate_dead_code
from snapc.passes import fused_ops  # noqa: F401 - registers torch.ops.snapc
from snapc.passes.fuse_common import add_weight, apply_rules, fetch, tensor_meta, weight_owner
from snapc.passes.rewrite import META_KEYS, Hit, module_path
from snapc.pipeline import PassContext, PassResult, register_pass

__all__ = ["AneAttentionLayout", "split_einsum_attention", "DEFAULT_CHUNK"]

aten = torch.ops.aten
DEFAULT_CHUNK = 512  # Apple ml-stable-diffusion SPLIT_EINSUM_V2 query chunk


def split_einsum_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float,
                           bias: Tensor | None, chunk: int) -> Tensor:
    """Return attention of channels-first (B, C, 1, S) tensors as (B, Cv, 1, S).

    Heads are split along channels, queries in chunks of ``chunk`` tokens; ``bias`` is the
    additive (B|1, heads|1, S, L) mask of snapc::attention.
    """
    head_dim, value_dim = q.shape[1] // heads, v.shape[1] // heads
    seq = q.shape[-1]
    outs = []
    for h, (qh, kh, vh) in enumerate(zip(q.split(head_dim, dim=1), k.split(head_dim, dim=1),
                                         v.split(value_dim, dim=1), strict=True)):
        pieces = []
        for start in range(0, seq, chunk):
            qc = qh[..., start:start + chunk]
            weights = torch.einsum("bchq,bchk->bkhq", qc, kh) * scale
            if bias is not None:
                hb = bias[:, h if bias.shape[1] > 1 else 0, start:start + chunk, :]
                weights = weights + hb.transpose(1, 2).unsqueeze(2)
            weights = weights.softmax(dim=1)
            pieces.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
        outs.append(torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0])
    return torch.cat(outs, dim=1)


def _channels_first(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """(B, S, C) -> (B, C, 1, S)."""
    return graph.call_function(aten.unsqueeze.default,
                               (graph.call_function(aten.transpose.int, (x, 1, 2)), 2))


def _channels_last(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """(B, C, 1, S) -> (B, S, C)."""
    return graph.call_function(aten.transpose.int,
                               (graph.call_function(aten.squeeze.dim, (x, 2)), 1, 2))


class _Converter:
    """Builds channels-first values for one graph, sharing conversions between users."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.graph = gm, gm.graph
        self.cf: dict[fx.Node, fx.Node] = {}
        self.convs = 0

    def input(self, x: fx.Node) -> fx.Node:
        if x not in self.cf:
            self.cf[x] = _channels_first(self.graph, x)
        return self.cf[x]

    def conv(self, linear: fx.Node, source: fx.Node | None = None) -> fx.Node | None:
        """Return ``linear`` as a 1x1 conv on its channels-first input (or on ``source``, a
        channels-first value standing for that input); None when it is not a plain linear."""
        if linear.target != aten.linear.default:
            return None
        args = list(linear.args) + [None] * (3 - len(linear.args))
        weight = fetch(self.gm, args[1])
        if weight is None or (args[2] is not None and fetch(self.gm, args[2]) is None):
            return None
        if linear in self.cf:
            return self.cf[linear]
        # in the module that holds the linear's weights, as the conv node is in its module:
        # a weight of an outer module becomes an input of the unflattened inner module
        owner = weight_owner(self.gm, [a for a in args[1:] if isinstance(a, fx.Node)])
        w4 = add_weight(self.gm, self.graph, "snapc_ane_conv_weight", weight[:, :, None, None],
                        owner=owner)
        source = self.input(args[0]) if source is None else source
        out = self.graph.call_function(aten.conv2d.default, (source, w4, args[2]))
        _copy_meta(linear, out)  # the conv stays in its projection's module (e.g. to_q)
        self.cf[linear] = out
        self.convs += 1
        return out

    def value(self, t: fx.Node) -> fx.Node:
        """Return ``t`` (B, S, C) as (B, C, 1, S), folding projections into convs."""
        if t in self.cf:
            return self.cf[t]
        out = self.conv(t) if len(t.users) == 1 else None
        if out is None and t.target is operator.getitem:
            split, index = t.args
            if split.target == aten.split_with_sizes.default and split.args[2] in (-1, 2):
                packed = self.conv(split.args[0]) if len(split.args[0].users) == 1 else None
                if packed is not None:
                    if split not in self.cf:
                        self.cf[split] = self.graph.call_function(
                            aten.split_with_sizes.default, (packed, split.args[1], 1))
                    out = self.graph.call_function(operator.getitem, (self.cf[split], index))
        if out is None:
            out = self.input(t)
        self.cf[t] = out
        return out


def _copy_meta(source: fx.Node, new: fx.Node) -> None:
    """Give ``new`` the module stack and stack trace of ``source`` where it has none."""
    for key in META_KEYS:
        if key in source.meta and key not in new.meta:
            new.meta[key] = source.meta[key]


def _ane_edit(gm: fx.GraphModule, chunk: int) -> list[Hit]:
    hits = []
    for node in list(gm.graph.nodes):
        if node.target != torch.ops.snapc.attention.default:
            continue
        before = set(gm.graph.nodes)
        q, k, v, heads, scale = node.args[:5]
        bias = node.args[5] if len(node.args) > 5 else node.kwargs.get("bias")
        conv = _Converter(gm)
        with gm.graph.inserting_before(node):
            cf = [conv.value(t) for t in (q, k, v)]
            attn = gm.graph.call_function(split_einsum_attention,
                                          (*cf, heads, scale, bias, chunk))
        users = list(node.users)
        replaced, result = node, attn
        if len(users) == 1:  # the output projection becomes a conv reading the new attention
            with gm.graph.inserting_before(users[0]):
                out_proj = conv.conv(users[0], source=attn)
            if out_proj is not None:
                replaced, result = users[0], out_proj
        with gm.graph.inserting_before(result.next):  # keeps the new nodes in order
            back = _channels_last(gm.graph, result)
        # Every node made here belongs to the attention's module (convs to their projection's,
        # above): a node without a module stack lands at the top level of the program's
        # module tree, and torch.export.unflatten then cuts the attention module into several
        # calls whose values it routes wrongly (the Core ML trace frontend failed on the VAE
        # decoder's mid-block attention: a 1-D bias fed to the output transpose).
        for new_node in gm.graph.nodes:
            if new_node not in before and new_node.op == "call_function":
                _copy_meta(node, new_node)
        replaced.replace_all_uses_with(back)
        seq = tensor_meta(q).shape[1] if tensor_meta(q) is not None else 0
        detail = {"heads": heads, "query_chunks": max(1, -(-seq // chunk)),
                  "conv_projections": conv.convs}
        hits.append(Hit("ane_split_einsum", module_path(node), 1, attn.name, detail))
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return hits


@register_pass
@dataclass(frozen=True)
class AneAttentionLayout:
    """Rewrite snapc::attention into the Neural Engine's split-einsum, channels-first form."""

    chunk: int = DEFAULT_CHUNK
    name = "ane_attention_layout"
    level = 2

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with every snapc::attention in the ANE layout."""
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}; use 512 (Apple's default)")
        return apply_rules(graph, (), self.name, ctx, edit=lambda gm: _ane_edit(gm, self.chunk))
