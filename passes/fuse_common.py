"""What every fusion pass shares: unlift, rewrite, re-export, verify, record.

A fusion pass edits a fresh unlifted copy of the program (``graph.program.module()``), so the
input Graph is never touched; it then drops dead nodes and unused weights, exports the module
again with torch.export and checks the new graph against the old one on the example inputs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import chain

import torch
from torch import fx, nn

from snapc.errors import VerificationError
from snapc.graph import Graph, drop_unused_attributes, eliminate_dead_code
from snapc.numerics import Numerics, verify
from snapc.passes.rewrite import Hit, Rule, rewrite
from snapc.pipeline import Change, PassContext, PassResult

__all__ = ["MIN_PSNR_DB", "apply_rules", "finish", "fetch", "add_weight", "weight_owner",
           "tensor_meta"]

# fp32 fusions reorder a few float operations; 80 dB PSNR (issue 7) leaves room only for that.
MIN_PSNR_DB = 80.0


def fetch(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """Return the tensor a ``get_attr`` node reads (None for any other node)."""
    if node.op != "get_attr":
        return None
    value: object = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def weight_owner(gm: fx.GraphModule, nodes: Iterable[fx.Node] = ()) -> str:
    """Return the deepest module path of ``gm`` holding every weight the get_attr ``nodes``
    read; with none, the one holding all of ``gm``'s weights (the model root, e.g. ``net``)."""
    weights = [name for name, _ in chain(gm.named_parameters(), gm.named_buffers())]
    known = set(weights)
    targets = [str(n.target) for n in nodes if n.op == "get_attr" and str(n.target) in known]
    targets = targets or weights
    return ".".join(os.path.commonprefix([t.split(".")[:-1] for t in targets]))


def add_weight(gm: fx.GraphModule, graph: fx.Graph, prefix: str, value: torch.Tensor,
               buffer: bool = False, owner: str | None = None) -> fx.Node:
    """Register ``value`` as a new parameter (or ``buffer``) of the submodule ``owner`` of
    ``gm`` (default: :func:`weight_owner`, the model root); return a get_attr node reading it.

    New weights live under the model root like the ones they replace: quantization records,
    block parameter counts and the targets name weights relative to ``Graph.root``. ``gm`` is
    the pass's own unlifted copy, so this edits nobody else's module.
    """
    owner = weight_owner(gm) if owner is None else owner
    module = gm.get_submodule(owner) if owner else gm
    index = 0
    while hasattr(module, f"{prefix}_{index}"):
        index += 1
    name = f"{prefix}_{index}"
    if buffer:
        module.register_buffer(name, value.detach().clone())
    else:
        module.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
    return graph.get_attr(f"{owner}.{name}" if owner else name)


def tensor_meta(node: object) -> torch.Tensor | None:
    """Return the fake tensor recorded for ``node`` by export (None when unknown)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def finish(graph: Graph, gm: fx.GraphModule, hits: list[Hit], pass_name: str,
           ctx: PassContext, min_psnr_db: float = MIN_PSNR_DB) -> PassResult:
    """Re-export the edited ``gm``, verify it against ``graph`` and return the PassResult.

    No hits: the input graph is returned unchanged. With ``ctx.check`` the new graph must
    reach ``min_psnr_db`` against the input on its example inputs (else VerificationError).
    """
    if not hits:
        return PassResult(graph, ())
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    gm.recompile()
    with torch.no_grad():
        program = torch.export.export(gm, graph.example_inputs, strict=False)
    new = graph.with_program(program)
    info: dict[str, object] = {"rule_counts": dict(Counter(h.rule for h in hits)),
                               "nodes_before": len(graph.fx.nodes),
                               "nodes_after": len(new.fx.nodes)}
    if ctx.check and not any(t.device.type == "meta" for t in graph.example_inputs):
        numerics: Numerics = verify(graph, new, graph.example_inputs)
        info["numerics"] = numerics.to_json()
        if not numerics.passes(min_psnr_db):
            raise VerificationError(
                f"{pass_name}: output PSNR {numerics.psnr_db:.1f} dB < {min_psnr_db} dB vs the "
                "unfused graph; report the model and run without this fusion")
    changes = tuple(Change(pass_name=pass_name, rule=h.rule, target=h.target, removed=h.removed,
                           added=1, detail={"node": h.node, **h.detail}) for h in hits)
    return PassResult(new, changes, info)


def apply_rules(graph: Graph, rules: Iterable[Rule], pass_name: str, ctx: PassContext,
                edit: Callable[[fx.GraphModule], list[Hit]] | None = None) -> PassResult:
    """Run ``rules`` (or ``edit(gm)``) on a copy of ``graph`` and return the verified result."""
    gm = graph.program.module()
    hits = edit(gm) if edit is not None else rewrite(gm, rules)
    return finish(graph, gm, hits, pass_name, ctx)
