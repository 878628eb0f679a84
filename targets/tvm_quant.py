"""Quantized weights for the TVM targets: integer codes as weights, dequantized in the graph.

The Quantize pass records a per-weight decision on the graph (``Graph.quant``). TVM has no
importer for QDQ graphs, so this module realises the records before import: each quantized
weight is replaced by its integer codes (an int8 or uint8 buffer: what ``params.safetensors``
then stores) plus its small parameters, and the graph computes the fp32 weight from them
(``codes * scale``, or ``lut[codes]`` for palettes) right before its conv or linear. TVM
imports that, ``ToMixedPrecision`` turns the compute to fp16 on mobile GPUs, and the
dequantization runs on the device each call: int8 weights, fp16 compute.

Realised: ``w8``/``w8a8`` (per-output-channel scales; w8a8's activation scales are not, as
TVM computes in fp16 and only the weights are stored quantized), ``w4`` (group scales; codes
stored one per int8 byte, TVM 0.27 has no packed int4 storage), ``palette6``/``palette4``
(uint8 codes plus the look-up table). ``fp16`` records need nothing here (the fp16 build
stores fp16 weights); fp32 islands are not realised (TVM computes the whole graph in fp16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from snapc.graph import Graph, drop_unused_attributes, eliminate_dead_code
from snapc.passes.quantize import NODE_PREFIX
from snapc.passes.quantize_schemes import weight_codes

__all__ = ["REALISED", "dequantizing_graph"]

REALISED = ("w8", "w8a8", "w4", "palette6", "palette4")


def _owner(gm: fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _buffers(weight: torch.Tensor, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the tensors that store ``weight`` under ``record`` (codes first)."""
    scheme = record["scheme"]
    codes = weight_codes(weight, record)
    if scheme.startswith("palette"):
        return {"codes": codes, "lut": record["lut"].float()}
    if scheme == "w4":
        group = record["group_size"]
        pad = (-codes.shape[1]) % group
        if pad:  # stored padded to whole groups, so the graph only reshapes
            codes = torch.cat([codes, codes.new_zeros((codes.shape[0], pad, *codes.shape[2:]))],
                              dim=1)
        return {"codes": codes, "scale": record["scale"].float().unsqueeze(2)}
    shape = (-1, *([1] * (weight.dim() - 1)))
    return {"codes": codes, "scale": record["scale"].float().reshape(shape)}


def _dequantize_nodes(graph: fx.Graph, stored: dict[str, fx.Node], record: dict[str, Any],
                      shape: tuple[int, ...]) -> fx.Node:
    """Insert the nodes that compute the fp32 weight from its stored tensors; return the last."""
    aten = torch.ops.aten
    codes = stored["codes"]
    if record["scheme"].startswith("palette"):
        index = graph.call_function(aten._to_copy.default, (codes,), {"dtype": torch.int64})
        return graph.call_function(aten.index.Tensor, (stored["lut"], [index]))
    values = graph.call_function(aten._to_copy.default, (codes,), {"dtype": torch.float32})
    if record["scheme"] != "w4":
        return graph.call_function(aten.mul.Tensor, (values, stored["scale"]))
    group = record["group_size"]
    out, padded = shape[0], codes.meta["val"].shape[1]
    grouped = graph.call_function(aten.view.default,
                                  (values, [out, padded // group, group, *shape[2:]]))
    scaled = graph.call_function(aten.mul.Tensor, (grouped, stored["scale"]))
    flat = graph.call_function(aten.view.default, (scaled, [out, padded, *shape[2:]]))
    if padded == shape[1]:
        return flat
    return graph.call_function(aten.slice.Tensor, (flat, 1, 0, shape[1]))


def dequantizing_graph(graph: Graph, records: dict[str, dict[str, Any]]) -> tuple[Graph, dict]:
    """Return ``graph`` with every weight whose record is in ``REALISED`` stored as integer
    codes and dequantized in the graph, and a summary {weight: {scheme, stored as}}.

    ``graph`` is not changed. Weights without a realisable record are left as they are."""
    gm = graph.edited()
    summary: dict[str, dict[str, Any]] = {}
    weights = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    for key, record in records.items():
        target = f"{graph.root}.{key}"
        if key.startswith(NODE_PREFIX) or record["scheme"] not in REALISED \
                or target not in weights:
            continue
        owner, attr = _owner(gm, target)
        weight = getattr(owner, attr).detach()
        node = weights[target]
        stored: dict[str, fx.Node] = {}
        tensors = _buffers(weight, record)
        with gm.graph.inserting_before(node):
            for suffix, tensor in tensors.items():
                # a parameter, not a buffer: TVM's importer keeps parameters as inputs
                # (params.safetensors) but binds buffers into the library as constants
                owner.register_parameter(f"{attr}_{suffix}",
                                         torch.nn.Parameter(tensor, requires_grad=False))
                stored[suffix] = gm.graph.get_attr(f"{target}_{suffix}")
                stored[suffix].meta["val"] = tensor
            value = _dequantize_nodes(gm.graph, stored, record, tuple(weight.shape))
        node.replace_all_uses_with(value)
        summary[key] = {"scheme": record["scheme"],
                        "stored": {k: [str(t.dtype).removeprefix("torch."), list(t.shape)]
                                   for k, t in tensors.items()}}
    eliminate_dead_code(gm)
    drop_unused_attributes(gm)
    return graph.reexport(gm), summary
