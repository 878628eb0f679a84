"""Count multiply-accumulates (MACs) of FX nodes from their recorded tensor shapes.

torch.export records a fake tensor in ``node.meta["val"]`` for every value, so shapes are
known without running anything. One MAC is one multiply plus one add; convolutions and linear
layers count ``output elements x reduction length``; attention counts both QK^T and AV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["NodeMacs", "node_macs", "OP_CLASS_CONV", "OP_CLASS_LINEAR", "OP_CLASS_ATTENTION"]

OP_CLASS_CONV = "conv"
OP_CLASS_LINEAR = "linear"
OP_CLASS_ATTENTION = "attention"

_aten = torch.ops.aten


@dataclass(frozen=True)
class NodeMacs:
    """MACs of one node and the op class they belong to (conv, linear or attention)."""

    macs: int
    op_class: str


def _shape(value: object) -> tuple[int, ...] | None:
    """Return the static shape of a fake tensor (or None when it is not a tensor)."""
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape)
    return None


def _arg_shape(node: fx.Node, index: int) -> tuple[int, ...] | None:
    arg = node.args[index] if len(node.args) > index else None
    return _shape(arg.meta.get("val")) if isinstance(arg, fx.Node) else None


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape else 0


def node_macs(node: fx.Node) -> NodeMacs | None:
    """Return the MACs of ``node`` if it is a conv, linear, matmul or attention op, else None."""
    if node.op != "call_function":
        return None
    target = node.target
    out = _shape(node.meta.get("val"))
    if target in (_aten.conv2d.default, _aten.convolution.default, _aten.conv1d.default):
        weight = _arg_shape(node, 1)
        if not weight or out is None:
            return None
        return NodeMacs(_numel(out) * math.prod(weight[1:]), OP_CLASS_CONV)
    if target is _aten.linear.default:
        weight = _arg_shape(node, 1)
        if not weight or out is None:
            return None
        return NodeMacs(_numel(out) * weight[1], OP_CLASS_LINEAR)
    if target in (_aten.addmm.default,):
        mat1 = _arg_shape(node, 1)
        return NodeMacs(_numel(out) * mat1[-1], OP_CLASS_LINEAR) if mat1 and out else None
    if target in (_aten.mm.default, _aten.bmm.default, _aten.matmul.default):
        lhs = _arg_shape(node, 0)
        return NodeMacs(_numel(out) * lhs[-1], OP_CLASS_ATTENTION) if lhs and out else None
    if target is _aten.baddbmm.default:
        lhs = _arg_shape(node, 1)
        return NodeMacs(_numel(out) * lhs[-1], OP_CLASS_ATTENTION) if lhs and out else None
    if target in _SDPA_OPS:
        query, key = _arg_shape(node, 0), _arg_shape(node, 1)
        value = _arg_shape(node, 2)
        if not query or not key or not value:
            return None
        # QK^T: (..., Lq, D) x (..., D, Lk); AV: (..., Lq, Lk) x (..., Lk, Dv)
        batch_heads = math.prod(query[:-2])
        lq, d, lk, dv = query[-2], query[-1], key[-2], value[-1]
        return NodeMacs(batch_heads * lq * lk * (d + dv), OP_CLASS_ATTENTION)
    return None


_SDPA_OPS: tuple[object, ...] = (
    _aten.scaled_dot_product_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
)
