"""Core-ATen decomposition for the TVM import, with attention as a plain softmax.

``from_exported_program`` first runs ``ExportedProgram.run_decompositions()``, whose table
turns ``aten.scaled_dot_product_attention`` into PyTorch's math path with ``_safe_softmax``:
every score row also goes through ``eq(-inf)``, ``any``, ``logical_not`` and ``where`` so that
a fully masked row gives zeros instead of NaN. Without a mask (every SD-class UNet's self- and
cross-attention) no row can be all ``-inf``, and those guards are whole extra passes over the
largest tensor of the model (8 heads x 4096^2 scores per SD-1.5 self-attention): on `shapes`
at batch 2 on x86 they were 0.8 ms of kernels. So the table here decomposes unmasked,
non-causal attention without dropout into ``softmax((q * scale) @ k^T) @ v`` (the guard's
result is the same for every finite row). A masked or causal one goes the way the op's own
kernel sends it: a boolean mask made additive, then PyTorch's math path, guards included.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["tvm_decompositions", "decompose_for_tvm"]


def _unmasked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                        is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False) -> Any:
    """``scaled_dot_product_attention`` without a mask, causality, dropout or GQA as matmuls
    and a softmax; anything else through PyTorch's own decomposition (its math path)."""
    import torch

    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        # What the op's own (composite) kernel does: a boolean mask (True: attend) becomes an
        # additive one, then the math path. (NotImplemented would keep the op whole, which
        # TVM legalizes as one unschedulable kernel.)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            additive = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            attn_mask = additive.masked_fill(attn_mask.logical_not(), float("-inf"))
        return torch.ops.aten._scaled_dot_product_attention_math.default(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
            enable_gqa=enable_gqa)[0]
    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    # the scale on the queries (L x D), not the scores (L x L): it fuses into the kernel
    # that lays the queries out for the matmul, as PyTorch's own decomposition's does
    scores = torch.matmul(query * factor, key.transpose(-2, -1))
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def tvm_decompositions() -> dict[Any, Any]:
    """Return torch.export's default decomposition table with unmasked attention as above."""
    import torch

    table = torch.export.default_decompositions()
    table[torch.ops.aten.scaled_dot_product_attention.default] = _unmasked_attention
    return table


def decompose_for_tvm(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Return ``program`` in core ATen for ``from_exported_program(run_ep_decomposition=False)``
    (a new program; ``program`` is not changed)."""
    return program.run_decompositions(tvm_decompositions())
