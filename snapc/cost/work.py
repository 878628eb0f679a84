"""What one FX node asks of a device: op class, FLOPs, bytes moved and kernel launches.

This is the device-independent half of the roofline. Shapes come from ``node.meta["val"]``
(torch.export records a fake tensor for every value), MACs from :func:`snapc.macs.node_macs`.

- FLOPs are ``2 x MACs`` for conv, linear and attention matmuls, and a few per element for
  softmax, norms and element-wise ops.
- Bytes are every tensor read (weights included) plus the tensor written. A norm reads its
  input twice (statistics, then normalisation).
- Attention intermediates: ``scaled_dot_product_attention`` without a fused kernel writes the
  score matrix, reads it for softmax, writes the probabilities and reads them for ``P @ V``:
  four passes over ``batch x heads x Lq x Lk`` elements, counted as memory traffic. That is
  what makes self-attention at 64x64 (4096 tokens) memory-bound on phones.
- Views (reshape, permute, slices, dropout in eval, metadata asserts) move no data and launch
  no kernel; they are class ``view`` so that eager runtimes can charge their dispatch cost.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from snapc.macs import node_macs

__all__ = [
    "NodeWork",
    "node_work",
    "OP_CLASSES",
    "CONV",
    "MATMUL",
    "ATTENTION",
    "NORM",
    "ELEMENTWISE",
    "VIEW",
    "DTYPE_BYTES",
    "dtype_key",
]

CONV = "conv"
MATMUL = "matmul"
ATTENTION = "attention"
NORM = "norm"
ELEMENTWISE = "elementwise"
VIEW = "view"
OP_CLASSES = (CONV, MATMUL, ATTENTION, NORM, ELEMENTWISE)

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}

_aten = torch.ops.aten


@dataclass(frozen=True)
class NodeWork:
    """Roofline inputs of one node.

    ``fusable`` marks element-wise epilogues (add, mul, activations) that a compiling runtime
    folds into the producing kernel; ``attention_scores`` is the element count of the score
    matrix a non-fused attention materialises (0 for other ops); ``rows`` is the M of a conv
    or linear as a GEMM (output pixels or tokens, batch included): small GEMMs reach a lower
    fraction of peak, which the fitted cost model learns per device. For an attention it is
    the query rows (batch x heads x query tokens) that a fused kernel spreads over the
    device's compute units; 0 for other ops.
    ``compute`` overrides the compute dtype of this node (int8 for a w8a8 layer; "" keeps the
    model's).
    """

    op_class: str
    flops: float
    bytes: float
    launches: int = 1
    fusable: bool = False
    attention_scores: float = 0.0
    rows: int = 0
    compute: str = ""

    def to_json(self) -> list[object]:
        """Return a compact JSON row ``[class, flops, bytes, launches, fusable, scores, rows,
        compute]``."""
        return [self.op_class, self.flops, self.bytes, self.launches, self.fusable,
                self.attention_scores, self.rows, self.compute]

    @classmethod
    def from_json(cls, row: list[object]) -> NodeWork:
        """Return the NodeWork written by :meth:`to_json` (tables from before ``rows`` have
        six columns and read as rows 0)."""
        op_class, flops, nbytes, launches, fusable, scores, *rest = row
        return cls(str(op_class), float(flops), float(nbytes), int(launches), bool(fusable),
                   float(scores), int(rest[0]) if rest else 0,
                   str(rest[1]) if len(rest) > 1 else "")


def dtype_key(dtype: torch.dtype | str) -> str:
    """Return the profile key (fp32, fp16, int8) of a torch dtype or dtype name."""
    name = str(dtype).replace("torch.", "")
    if name in DTYPE_BYTES:
        return name
    if name in ("float16", "bfloat16", "half"):
        return "fp16"
    if name in ("int8", "uint8", "qint8", "quint8"):
        return "int8"
    return "fp32"


# No data moves: views, metadata checks, dropout in eval mode, getitem of tuples.
_FREE = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default,
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.expand.default,
    _aten.slice.Tensor, _aten.select.int, _aten.chunk.default, _aten.split.Tensor,
    _aten.split_with_sizes.default, _aten.alias.default, _aten.detach.default,
    _aten._assert_tensor_metadata.default, _aten.dropout.default, _aten.lift_fresh_copy.default,
    _aten.flatten.using_ints, _aten.unflatten.int, _aten.sym_size.int, operator.getitem,
}
_NORMS = {
    _aten.group_norm.default, _aten.native_group_norm.default, _aten.layer_norm.default,
    _aten.native_layer_norm.default, _aten.batch_norm.default,
    _aten._native_batch_norm_legit_no_training.default,
}
_SOFTMAX = {_aten.softmax.int, _aten._softmax.default, _aten._safe_softmax.default}
_SDPA = {
    _aten.scaled_dot_product_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# Element-wise ops that are not epilogues: data movement a compiler cannot fold away.
_COPIES = {
    _aten.cat.default, _aten.contiguous.default, _aten.clone.default, _aten.copy.default,
    _aten.upsample_nearest2d.vec, _aten.upsample_nearest2d.default, _aten.pad.default,
    _aten.constant_pad_nd.default, _aten.arange.start, _aten.arange.default,
    _aten.full.default, _aten.zeros.default, _aten.ones.default,
}
# Per-element FLOPs of transcendental activations (polynomial approximations).
_ACTIVATION_FLOPS = {_aten.silu.default: 8, _aten.gelu.default: 12, _aten.exp.default: 8,
                     _aten.sin.default: 8, _aten.cos.default: 8, _aten.sigmoid.default: 8,
                     _aten.tanh.default: 8}


def _tensor_vals(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _numel(tensors: list[torch.Tensor]) -> int:
    return sum(math.prod(int(d) for d in t.shape) for t in tensors)


def _elem_bytes(tensor: torch.Tensor, dtype: str | None) -> int:
    if dtype is not None and tensor.is_floating_point():
        return DTYPE_BYTES[dtype]
    return tensor.element_size()


def _bytes(tensors: list[torch.Tensor], dtype: str | None) -> int:
    return sum(math.prod(int(d) for d in t.shape) * _elem_bytes(t, dtype) for t in tensors)


def _inputs(node: fx.Node) -> list[torch.Tensor]:
    return [t for arg in node.all_input_nodes for t in _tensor_vals(arg.meta.get("val"))]


def _input_bytes(node: fx.Node, dtype: str | None, weight_bits: Mapping[str, int]) -> float:
    """Bytes of every tensor ``node`` reads; a weight in ``weight_bits`` (placeholder name ->
    stored bits per element, from quantization records) counts at its stored size."""
    total = 0.0
    for arg in node.all_input_nodes:
        tensors = _tensor_vals(arg.meta.get("val"))
        bits = weight_bits.get(arg.name)
        total += _numel(tensors) * bits / 8 if bits else _bytes(tensors, dtype)
    return total


def _is_same_dtype_cast(node: fx.Node) -> bool:
    if node.target not in (_aten.to.dtype, _aten._to_copy.default, _aten.to.dtype_layout):
        return False
    src = node.all_input_nodes[0].meta.get("val") if node.all_input_nodes else None
    out = node.meta.get("val")
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) \
        and src.dtype == out.dtype


def node_work(node: fx.Node, dtype: str | None = None,
              weight_bits: Mapping[str, int] | None = None,
              int8_compute: frozenset[str] = frozenset()) -> NodeWork | None:
    """Return the roofline inputs of ``node``, or None for placeholders, weights and output.

    Views and no-op casts are class ``view`` with no FLOPs, bytes or kernel launches.
    ``dtype`` ("fp32", "fp16", "int8") overrides the element size of floating-point tensors
    (weights and activations); None keeps the dtypes recorded in the graph. ``weight_bits``
    gives quantized weights' stored bits (by placeholder name) and ``int8_compute`` the nodes
    that compute in int8 (w8a8 layers). Never edits the node.
    """
    if node.op != "call_function":
        return None
    outputs = _tensor_vals(node.meta.get("val"))
    if node.target in _FREE or _is_same_dtype_cast(node) or not outputs:
        return NodeWork(VIEW, 0.0, 0.0, launches=0)
    inputs = _inputs(node)
    out_bytes, in_bytes = _bytes(outputs, dtype), _input_bytes(node, dtype, weight_bits or {})
    out_numel = _numel(outputs)
    target = node.target
    if target in _SDPA:
        return _attention_work(node, inputs, in_bytes + out_bytes)
    counted = node_macs(node)
    if counted is not None:
        op_class = {"conv": CONV, "linear": MATMUL}.get(counted.op_class, ATTENTION)
        return NodeWork(op_class, 2.0 * counted.macs, in_bytes + out_bytes,
                        rows=_gemm_rows(outputs[0], op_class),
                        compute="int8" if node.name in int8_compute else "")
    if target in _SOFTMAX:
        return NodeWork(ATTENTION, 5.0 * out_numel, in_bytes + out_bytes)
    if target in _NORMS:
        first = _bytes(inputs[:1], dtype)
        return NodeWork(NORM, 8.0 * out_numel, in_bytes + first + out_bytes)
    flops = _ACTIVATION_FLOPS.get(target, 1) * out_numel
    return NodeWork(ELEMENTWISE, float(flops), in_bytes + out_bytes,
                    fusable=target not in _COPIES)


def _gemm_rows(output: torch.Tensor, op_class: str) -> int:
    """Return M of the op as a GEMM: batch x output pixels for a conv (NCHW), every leading
    dimension for a linear or matmul; 0 for attention matmuls outside a fused kernel."""
    shape = [int(d) for d in output.shape]
    if op_class == CONV and len(shape) >= 3:
        return shape[0] * math.prod(shape[2:])
    if op_class == MATMUL and shape:
        return math.prod(shape[:-1])
    return 0


def _attention_work(node: fx.Node, inputs: list[torch.Tensor], io_bytes: int) -> NodeWork:
    """Fused-attention work, its query rows and the score-matrix size a non-fused kernel
    materialises."""
    counted = node_macs(node)
    query, key = inputs[0], inputs[1]
    rows = math.prod(int(d) for d in query.shape[:-1])
    scores = rows * int(key.shape[-2])
    flops = 2.0 * (counted.macs if counted else 0) + 5.0 * scores
    return NodeWork(ATTENTION, flops, float(io_bytes), launches=1, attention_scores=float(scores),
                    rows=rows)
