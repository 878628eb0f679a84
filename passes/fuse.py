"""The fusion passes as one set: which exist, in which order, and the lowering per target.

Fusions run in this order (each needs the ones before it to see its pattern):

=====================  ==================================================================
remove_identities      drop inference dropout, no-op casts, contiguous/clone, x*1, x/1
fold_constants         evaluate weight/constant-only subgraphs once
fuse_attention         unfused attention -> scaled_dot_product_attention
fold_attention_heads   head split + SDPA + head merge -> snapc::attention on (B, S, D)
pack_qkv               self-attention q/k/v projections -> one linear
pack_kv                cross-attention k/v projections -> one linear
fuse_group_norm_silu   silu(group_norm(x)) -> snapc::group_norm_silu
fuse_geglu             linear + chunk + h * gelu(g) -> snapc::geglu
=====================  ==================================================================

Lowering per target (``lowering_passes(target)``): ``onnx`` keeps the snapc ops (the export
translates them, ``fused_ops.onnx_translations()``); ``tvm`` decomposes them back to ATen
(``snapc::attention`` -> ``scaled_dot_product_attention``, which TVM's frontend maps to one
``R.nn.attention`` kernel, GroupNorm+SiLU and GEGLU to ops TVM's FuseOps merges again);
``coreml`` rewrites attention into the Neural Engine layout (``passes/ane_layout.py``) and
decomposes the rest. ``torch`` and unknown targets decompose everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx

from snapc.errors import UnknownNameError
from snapc.graph import Graph
from snapc.passes.fuse_activation import FuseGEGLU, FuseGroupNormSiLU
from snapc.passes.fuse_attention import FoldAttentionHeads, FuseAttention, PackKV, PackQKV
from snapc.passes.fuse_cleanup import FoldConstants, RemoveIdentities
from snapc.passes.fuse_common import apply_rules
from snapc.passes.fused_ops import FUSED_OPS
from snapc.passes.rewrite import Hit, module_path
from snapc.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["FUSIONS", "fusion_passes", "DecomposeFusedOps", "lowering_passes",
           "LOWERING_TARGETS"]

FUSIONS: dict[str, type] = {
    p.name: p for p in (RemoveIdentities, FoldConstants, FuseAttention, FoldAttentionHeads,
                        PackQKV, PackKV, FuseGroupNormSiLU, FuseGEGLU)
}


def fusion_passes(selection: str | Iterable[str] = "all") -> list[Pass]:
    """Return fusion pass objects in pipeline order: ``"all"``, ``"none"`` or a list of names
    (comma-separated string or iterable). Raises UnknownNameError listing the valid names."""
    if isinstance(selection, str):
        if selection == "all":
            return [cls() for cls in FUSIONS.values()]
        if selection == "none":
            return []
        selection = [s.strip() for s in selection.split(",") if s.strip()]
    wanted = set(selection)
    for name in wanted:
        if name not in FUSIONS:
            raise UnknownNameError("fusion", name, list(FUSIONS) + ["all", "none"])
    return [cls() for name, cls in FUSIONS.items() if name in wanted]


def _decompose_edit(gm: fx.GraphModule) -> list[Hit]:
    hits = []
    for node in list(gm.graph.nodes):
        reference = FUSED_OPS.get(node.target)
        if reference is None:
            continue
        with gm.graph.inserting_before(node):  # re-export traces the reference into ATen
            plain = gm.graph.call_function(reference, node.args, node.kwargs)
        plain.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace")
                           if k in node.meta})
        node.replace_all_uses_with(plain)
        gm.graph.erase_node(node)
        hits.append(Hit(f"decompose_{node.target.name().split('::')[1]}", module_path(node),
                        1, plain.name))
    gm.graph.lint()
    gm.recompile()
    return hits


@register_pass
@dataclass(frozen=True)
class DecomposeFusedOps:
    """Replace snapc fused ops by their ATen reference (for targets without the custom ops).

    Records: one Change per op (rule ``decompose_<op>``).
    """

    name = "decompose_fused_ops"
    level = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with no snapc:: ops left."""
        return apply_rules(graph, (), self.name, ctx, edit=_decompose_edit)


LOWERING_TARGETS = ("onnx", "tvm", "coreml", "torch")


def lowering_passes(target: str, chunk: int | None = None) -> list[Pass]:
    """Return the passes that lower fused ops for ``target`` (see the module docstring).

    ``chunk`` is the Core ML query chunk (default 512, Apple's SPLIT_EINSUM_V2).
    Raises UnknownNameError for a target not in LOWERING_TARGETS.
    """
    if target == "onnx":
        return []
    if target in ("tvm", "torch"):
        return [DecomposeFusedOps()]
    if target == "coreml":
        from snapc.passes.ane_layout import AneAttentionLayout

        layout = AneAttentionLayout() if chunk is None else AneAttentionLayout(chunk=chunk)
        return [layout, DecomposeFusedOps()]
    raise UnknownNameError("lowering target", target, list(LOWERING_TARGETS))
