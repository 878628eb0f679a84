"""snapc's fused operators: torch custom ops with reference kernels, and their ONNX lowering.

Fusion passes replace multi-node patterns by these ops so that every target sees one node:

- ``snapc::attention(q, k, v, heads, scale, bias)``: multi-head attention on (B, S, heads*dh)
  queries and (B, L, heads*dh) keys/values, optional additive ``bias`` broadcastable to
  (B, heads, S, L); returns (B, S, heads*dv). ONNX: ``com.microsoft.MultiHeadAttention``
  (onnxruntime's CPU kernel runs a flash-style tiled loop, no S x L score tensor in memory).
- ``snapc::group_norm_silu(x, weight, bias, groups, eps)``: ``silu(group_norm(x))``.
  ONNX: InstanceNormalization over groups + affine + ``com.microsoft.QuickGelu(alpha=1)``
  (x * sigmoid(x) in one kernel; opset-18 GroupNormalization has per-group scales, so it
  cannot express diffusers' per-channel affine).
- ``snapc::geglu(x, weight, bias)``: ``h * gelu(g)`` where ``h, g = linear(x).chunk(2, -1)``.
  ONNX: one MatMul, Split, bias Add and ``com.microsoft.BiasGelu`` (bias + exact GELU in one
  kernel; BiasSplitGelu, onnxruntime's UNet fusion for this, has no CPU kernel).

``onnx_translations()`` returns the table to pass as ``torch.onnx.export(...,
custom_translation_table=...)``. ``DECOMPOSITIONS`` maps each op to its reference function
for targets that want plain ATen ops back (see ``passes/fuse.py: DecomposeFusedOps``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "group_norm_silu", "geglu", "FUSED_OPS", "onnx_translations",
           "attention_reference", "group_norm_silu_reference", "geglu_reference"]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float,
                        bias: Tensor | None = None) -> Tensor:
    """Return softmax(q k^T * scale + bias) v per head, for (B, S, heads*dh) inputs."""
    batch, seq, _ = q.shape
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, -1)


def group_norm_silu_reference(x: Tensor, weight: Tensor, bias: Tensor, groups: int,
                              eps: float) -> Tensor:
    """Return silu(group_norm(x, groups, weight, bias, eps))."""
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def geglu_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Return h * gelu(g) where h, g are the two halves of linear(x, weight, bias)."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@torch.library.custom_op("snapc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float,
              bias: Tensor | None = None) -> Tensor:
    """Multi-head attention on (B, S, heads*dh) tensors (see the module docstring)."""
    return attention_reference(q, k, v, heads, scale, bias)


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float,
      bias: Tensor | None = None) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


@torch.library.custom_op("snapc::group_norm_silu", mutates_args=())
def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """silu(group_norm(x)) as one op."""
    return group_norm_silu_reference(x, weight, bias, groups, eps)


@group_norm_silu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("snapc::geglu", mutates_args=())
def geglu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """GEGLU feed-forward input projection as one op."""
    return geglu_reference(x, weight, bias)


@geglu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


# op overload -> reference function (same signature), for decomposing back to ATen.
FUSED_OPS: dict[object, Callable[..., Tensor]] = {
    torch.ops.snapc.attention.default: attention_reference,
    torch.ops.snapc.group_norm_silu.default: group_norm_silu_reference,
    torch.ops.snapc.geglu.default: geglu_reference,
}


def _contrib_schema(name: str, inputs: list[str], attributes: dict[str, str]) -> object:
    """Return an onnx OpSchema for a com.microsoft op (the onnx package ships none of them).

    Inputs named with a trailing ``?`` are optional. Only what onnxscript needs to build the
    node is described: one float type constraint, the attribute names and kinds.
    """
    from onnx.defs import OpSchema

    single = OpSchema.FormalParameterOption.Single
    optional = OpSchema.FormalParameterOption.Optional
    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    params = [OpSchema.FormalParameter(n.rstrip("?"), "T", param_option=optional
                                       if n.endswith("?") else single) for n in inputs]
    return OpSchema(
        name, "com.microsoft", 1, inputs=params,
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute(a, kinds[k], "", required=False)
                    for a, k in attributes.items()],
    )


class _ContribOps:
    """The com.microsoft ops the ONNX lowering emits, callable like an onnxscript opset."""

    SIGNATURES = {
        "MultiHeadAttention": (["query", "key?", "value?", "bias?", "key_padding_mask?",
                                "attention_bias?"], {"num_heads": "int", "scale": "float"}),
        "QuickGelu": (["X"], {"alpha": "float"}),
        "BiasGelu": (["A", "B"], {}),
        "Gelu": (["X"], {}),
    }

    def __init__(self, opset: object) -> None:
        import onnxscript

        for name, (inputs, attributes) in self.SIGNATURES.items():
            schema = _contrib_schema(name, inputs, attributes)
            setattr(self, name, onnxscript.values.Op(opset, name, schema))


def onnx_translations() -> dict[object, Callable[..., object]]:
    """Return {snapc op: onnxscript function} for torch.onnx's ``custom_translation_table``.

    The functions emit com.microsoft contrib ops that onnxruntime's CPU provider implements
    (MultiHeadAttention, QuickGelu, BiasGelu) and standard opset-18 ops.
    """
    import onnx
    import onnxscript
    from onnxscript import opset18 as op

    msft = _ContribOps(onnxscript.values.Opset("com.microsoft", 1))

    def attention_onnx(q, k, v, heads: int, scale: float, bias=None):
        if bias is None:
            return msft.MultiHeadAttention(q, k, v, num_heads=heads, scale=scale)
        return msft.MultiHeadAttention(q, k, v, None, None, bias, num_heads=heads, scale=scale)

    def group_norm_silu_onnx(x, weight, bias, groups: int, eps: float):
        grouped = op.Reshape(x, op.Constant(value_ints=[0, groups, -1]))
        ones = op.ConstantOfShape(op.Constant(value_ints=[groups]),
                                  value=onnx.helper.make_tensor("one", 1, [1], [1.0]))
        zeros = op.ConstantOfShape(op.Constant(value_ints=[groups]),
                                   value=onnx.helper.make_tensor("zero", 1, [1], [0.0]))
        normed = op.InstanceNormalization(grouped, ones, zeros, epsilon=eps)
        normed = op.Reshape(normed, op.Shape(x))
        axes = op.Constant(value_ints=[1, 2])
        affine = op.Add(op.Mul(normed, op.Unsqueeze(weight, axes)), op.Unsqueeze(bias, axes))
        return msft.QuickGelu(affine, alpha=1.0)

    def geglu_onnx(x, weight, bias=None):
        projected = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
        hidden, gate = op.Split(projected, num_outputs=2, axis=-1)
        if bias is None:
            return op.Mul(hidden, msft.Gelu(gate))
        bias_h, bias_g = op.Split(bias, num_outputs=2, axis=0)
        return op.Mul(op.Add(hidden, bias_h), msft.BiasGelu(gate, bias_g))

    return {
        torch.ops.snapc.attention.default: attention_onnx,
        torch.ops.snapc.group_norm_silu.default: group_norm_silu_onnx,
        torch.ops.snapc.geglu.default: geglu_onnx,
    }
