"""Quantize: decide each layer's weight (and activation) quantization and record it on the graph.

The program is left unchanged (fp32 weights, so the torch reference stays fp32); the decision
is a set of per-weight *records* (see :mod:`snapc.passes.quantize_schemes`) that each target
realises natively: ONNX as QDQ (:mod:`snapc.targets.onnx_qdq`), Core ML through
``coremltools.optimize.coreml`` (:func:`coreml_records`). :func:`apply_records_to_module`
returns the fake-quantized graph that measures the quality in torch.

Schemes: ``fp16`` (every parameter fp16, activations rounded to fp16, fp32 islands found on the
calibration set), ``w8``, ``w4``, ``palette6``, ``palette4`` (conv/linear weights),
``w8a8`` (w8 weights, static uint8 activation scales from calibration), ``mixed`` (per-layer
w8/palette6/palette4 by sensitivity to meet ``size_mb`` or ``psnr_floor_db``).

Requires: a graph whose conv/linear weights are parameters (any pass order; run it last so the
records name the final weights). Calibration: ``fp16``, ``w8a8`` and ``mixed`` run
``calibration`` triples of :func:`snapc.calibration.calibration_inputs` (or ``inputs``).
Records: one Change per weight whose record is new or different (rule ``quantize_<scheme>``)
and one per fp32 island (rule ``keep_fp32_island``); a second run records nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from snapc.errors import BudgetError, SnapcError
from snapc.graph import Graph
from snapc.passes.quantize_mixed import (
    CANDIDATES,
    candidate_sizes,
    choose_schemes,
    layer_sensitivity,
    measure_psnr,
)
from snapc.passes.quantize_observers import (
    activation_ranges,
    calibration_chunks,
    find_fp32_islands,
    kept_float,
    quantizable_layers,
)
from snapc.passes.quantize_schemes import BITS, dequantize, make_record, record_bytes
from snapc.pipeline import Change, PassContext, PassResult, PipelineResult, register_pass

__all__ = ["Quantize", "SCHEMES", "check_scheme", "quantize_records", "quant_records",
           "apply_records_to_module", "coreml_records", "records_summary", "NODE_PREFIX"]

SCHEMES = ("fp16", "w8", "w4", "w8a8", "palette6", "palette4", "mixed")
NODE_PREFIX = "node:"  # records of FX nodes (fp32 islands), not of weights
QuantRecords = dict[str, dict[str, Any]]


def _strip(graph: Graph, name: str) -> str:
    return name.removeprefix(f"{graph.root}.")


def _param(gm: fx.GraphModule, target: str) -> torch.nn.Parameter:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Bind a new parameter at ``target``: the old tensor is shared with the source program."""
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name,
            torch.nn.Parameter(value, requires_grad=False))


def _calibration(graph: Graph, inputs: tuple[torch.Tensor, ...] | None, n: int, seed: int
                 ) -> list[tuple[torch.Tensor, ...]]:
    if inputs is None:
        from snapc.calibration import calibration_inputs

        if n < 1:
            raise SnapcError("the calibration set is empty; use --calibration N with N >= 1")
        inputs = calibration_inputs(graph, n * graph.example_inputs[0].shape[0], seed)
    return calibration_chunks(graph, inputs)


def check_scheme(scheme: str, size_mb: float | None = None, psnr_floor_db: float | None = None
                 ) -> None:
    """Raise SnapcError naming the fix when ``scheme`` and its budget do not go together:
    an unknown scheme, a budget without ``mixed``, ``mixed`` without exactly one budget, or a
    budget that is not positive."""
    if scheme not in SCHEMES:
        raise SnapcError(f"unknown quantization scheme '{scheme}'; use one of {', '.join(SCHEMES)}")
    given = [flag for flag, value in (("--size-mb", size_mb), ("--psnr-floor", psnr_floor_db))
             if value is not None]
    if scheme != "mixed" and given:
        verb, pronoun = ("apply", "them") if len(given) > 1 else ("applies", "it")
        raise SnapcError(f"{' and '.join(given)} {verb} only to --quantize mixed (the per-layer "
                         f"choice); drop {pronoun} for {scheme}")
    if scheme == "mixed" and len(given) != 1:
        raise SnapcError("--quantize mixed needs exactly one of --size-mb N (artifact size "
                         "budget) or --psnr-floor DB (UNet output PSNR floor)")
    if size_mb is not None and size_mb <= 0:
        raise SnapcError(f"--size-mb {size_mb} is not a size; give megabytes > 0")


def quantize_records(graph: Graph, scheme: str, *, size_mb: float | None = None,
                     psnr_floor_db: float | None = None, calibration: int = 8,
                     inputs: tuple[torch.Tensor, ...] | None = None, seed: int = 0,
                     group_size: int = 32, observer: str = "percentile",
                     percentile: float = 99.99, min_elements: int = 2048
                     ) -> tuple[QuantRecords, dict[str, Any]]:
    """Return (records, info) quantizing ``graph`` with ``scheme``; ``graph`` is not edited.

    ``info`` holds what was measured: fp32 islands, per-layer sensitivity and choices (mixed),
    and for weight schemes what stays float (``kept_float``, see quantize_observers.kept_float).
    Raises SnapcError for an unknown scheme and CalibrationError for a bad calibration set.
    """
    check_scheme(scheme, size_mb, psnr_floor_db)
    gm = graph.module()
    layers = quantizable_layers(gm, graph.root, min_elements)
    weights = {key: _param(gm, f"{graph.root}.{key}").data for key in layers}
    info: dict[str, Any] = {"scheme": scheme, "layers": len(layers)}
    if scheme != "fp16":  # fp16 records every parameter
        info["kept_float"] = {"min_elements": min_elements, **kept_float(gm, layers, graph.root)}
    if scheme in ("w8", "w4", "palette6", "palette4"):
        records = {k: make_record(w, scheme, group_size, seed) for k, w in weights.items()}
    elif scheme == "w8a8":
        chunks = _calibration(graph, inputs, calibration, seed)
        ranges = activation_ranges(graph, chunks, layers, observer, percentile, seed)
        records = {}
        for key, w in weights.items():
            records[key] = make_record(w, "w8a8")
            records[key]["input_scale"], records[key]["input_zero_point"] = ranges[key]["input"]
            if "output" in ranges[key]:
                records[key]["output_scale"], records[key]["output_zero_point"] = \
                    ranges[key]["output"]
        info |= {"observer": observer, "calibration_samples": len(chunks)}
    elif scheme == "fp16":
        chunks = _calibration(graph, inputs, calibration, seed)
        islands = find_fp32_islands(graph, chunks)
        island_weights = {_strip(graph, a.target) for n in gm.graph.nodes if n.name in islands
                          for a in n.all_input_nodes if a.op == "get_attr"}
        records = {_strip(graph, name): make_record(t, "fp32" if _strip(graph, name)
                                                    in island_weights else "fp16")
                   for name, t in graph.program.state_dict.items() if t.is_floating_point()}
        records |= {f"{NODE_PREFIX}{n}": {"scheme": "fp32", **v} for n, v in islands.items()}
        info |= {"fp32_islands": islands, "calibration_samples": len(chunks)}
    else:
        records, info["mixed"] = _mixed(graph, gm, weights, size_mb, psnr_floor_db,
                                        _calibration(graph, inputs, calibration, seed), seed)
    return records, info


def _mixed(graph: Graph, gm: fx.GraphModule, weights: dict[str, torch.Tensor],
           size_mb: float | None, psnr_floor_db: float | None,
           chunks: list[tuple[torch.Tensor, ...]], seed: int) -> tuple[QuantRecords, dict]:
    quantized = {f"{graph.root}.{k}" for k in weights}
    other = sum(t.numel() * t.element_size() for n, t in graph.program.state_dict.items()
                if n not in quantized)
    smallest = other + sum((w.numel() * BITS[CANDIDATES[-1]] + 7) // 8 for w in weights.values())
    if size_mb is not None and smallest > size_mb * 1e6:  # before the costly sensitivity runs
        raise BudgetError(f"mixed precision cannot reach {size_mb} MB (smallest is over "
                          f"{smallest / 1e6:.3g} MB: every layer {CANDIDATES[-1]}, the rest "
                          "fp32); raise --size-mb")
    candidates, psnr = layer_sensitivity(gm, chunks, list(weights), root=graph.root, seed=seed)
    sizes = candidate_sizes(gm, candidates, graph.root)
    chosen = choose_schemes(psnr, sizes, other, size_mb, psnr_floor_db)
    records = {key: candidates[key][s] for key, s in chosen.items()}
    reference = torch.cat([gm(*c) for c in chunks]).detach()
    elements = sum(w.numel() for w in weights.values())
    total = other + sum(sizes[k][s] for k, s in chosen.items())
    return records, {
        "size_mb": round(total / 1e6, 3),
        "mean_bits": sum(BITS[s] * weights[k].numel() for k, s in chosen.items()) / elements,
        "psnr_db": measure_psnr(gm, chunks, reference, records, graph.root),
        "layers": {k: {"scheme": s, "sensitivity_psnr_db": psnr[k]} for k, s in chosen.items()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for k in a)


def quant_records(obj: Graph | PassResult | PipelineResult) -> QuantRecords:
    """Return the quantization records of a graph (its ``quant`` field), of a Quantize result
    (``info["quant"]``) or of the last Quantize in a pipeline result; {} when there are none."""
    if isinstance(obj, PipelineResult):
        found = [r.info["quant"] for r in obj.records if "quant" in r.info]
        return found[-1] if found else quant_records(obj.graph)
    if isinstance(obj, PassResult):
        return obj.info.get("quant") or quant_records(obj.graph)
    return dict(getattr(obj, "quant", None) or {})


def records_summary(records: QuantRecords) -> dict[str, dict[str, Any]]:
    """Return a JSON-ready view of records: scheme, bits, scalar parameters, tensor shapes."""
    out = {}
    for key, record in records.items():
        out[key] = {k: (list(v.shape) if isinstance(v, torch.Tensor) else v)
                    for k, v in record.items()}
    return out


def coreml_records(records: QuantRecords) -> dict[str, dict[str, str]]:
    """Return the records the Core ML target understands ({weight: {"scheme": ...}}): ``w8a8``
    weights become ``w8``; fp32 islands, node records and ``w4`` (not in
    targets/coreml_quant.SCHEMES yet) are left out, i.e. stay fp16 there."""
    mapped = {"w8a8": "w8"}
    return {k: {"scheme": mapped.get(r["scheme"], r["scheme"])} for k, r in records.items()
            if not k.startswith(NODE_PREFIX) and r["scheme"] not in ("fp32", "w4")}


def _fake_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` to uint8 (QuantizeLinear rounds half to even, as torch.round)."""
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


def _round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round an fp32 activation to fp16 and back (fp16 storage of activations)."""
    return x.to(torch.float16).to(torch.float32)


def _insert_activation_quant(gm: fx.GraphModule, node: fx.Node, record: dict[str, Any]) -> None:
    with gm.graph.inserting_before(node):
        q_in = gm.graph.call_function(
            _fake_uint8, (node.args[0], record["input_scale"], record["input_zero_point"]))
    node.replace_input_with(node.args[0], q_in)
    if "output_scale" in record:
        with gm.graph.inserting_after(node):
            q_out = gm.graph.call_function(
                _fake_uint8, (node, record["output_scale"], record["output_zero_point"]))
        node.replace_all_uses_with(q_out, delete_user_cb=lambda user: user is not q_out)


def _bias_record(record: dict[str, Any]) -> torch.Tensor:
    """Return the int32 bias scales of a w8a8 layer: input scale times weight scales."""
    return record["input_scale"] * record["scale"]


def apply_records_to_module(graph: Graph, records: QuantRecords | None = None,
                            activations: bool = True) -> Graph:
    """Return a new Graph computing what the quantized artifact computes (fake quantization).

    Weights are replaced by their quantize-dequantize values; ``w8a8`` layers get uint8
    fake-quantization of their input (and output, for convs) and int32-rounded biases; with
    ``fp16`` records every fp32 activation outside the fp32 islands is rounded to fp16.
    ``records`` defaults to :func:`quant_records` of ``graph``; ``activations=False`` changes
    the weights only (what the ONNX fp16 artifact computes). ``graph`` is not edited.
    """
    records = quant_records(graph) if records is None else records
    gm = graph.edited()
    nodes = {n.name: n for n in gm.graph.nodes}
    consumers = {a.target: n for n in gm.graph.nodes if n.op == "call_function"
                 for a in n.args[1:2] if isinstance(a, fx.Node) and a.op == "get_attr"}
    fp16 = False
    for key, record in records.items():
        if key.startswith(NODE_PREFIX):
            continue
        target = f"{graph.root}.{key}"
        _set_param(gm, target, dequantize(_param(gm, target).data, record))
        fp16 |= record["scheme"] == "fp16"
        if activations and record["scheme"] == "w8a8" and target in consumers:
            node = consumers[target]
            if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
                bias, scale = _param(gm, node.args[2].target).data, _bias_record(record)
                _set_param(gm, node.args[2].target, torch.round(bias / scale) * scale)
            _insert_activation_quant(gm, node, record)
    if fp16 and activations:
        islands = {k.removeprefix(NODE_PREFIX) for k in records if k.startswith(NODE_PREFIX)}
        for name, node in nodes.items():
            val = node.meta.get("val")
            if (node.op == "call_function" and name not in islands and node.users
                    and isinstance(val, torch.Tensor) and val.dtype == torch.float32):
                with gm.graph.inserting_after(node):
                    rounded = gm.graph.call_function(_round_fp16, (node,))
                node.replace_all_uses_with(rounded, delete_user_cb=lambda u, r=rounded: u is not r)
    return graph.reexport(gm)


def _changes(graph: Graph, old: QuantRecords, new: QuantRecords) -> list[Change]:
    state = graph.program.state_dict
    changes = []
    for key, record in new.items():
        if key in old and _same(old[key], record):
            continue
        if key.startswith(NODE_PREFIX):
            changes.append(Change(Quantize.name, "keep_fp32_island", key.removeprefix(NODE_PREFIX),
                                  detail={"op": record["op"], "reason": record["reason"]}))
            continue
        weight = state[f"{graph.root}.{key}"]
        changes.append(Change(Quantize.name, f"quantize_{record['scheme']}", key, detail={
            "bits": record["bits"], "bytes_before": weight.numel() * weight.element_size(),
            "bytes_after": record_bytes(weight, record)}))
    return changes


@register_pass
@dataclass(frozen=True)
class Quantize:
    """Record per-layer quantization (scheme, scales, look-up tables) on the graph.

    ``scheme``: fp16, w8, w4, w8a8, palette6, palette4 or mixed (with ``size_mb`` or
    ``psnr_floor_db``). ``calibration`` triples (or explicit ``inputs``) feed the observers.
    """

    scheme: str = "w8"
    size_mb: float | None = None
    psnr_floor_db: float | None = None
    calibration: int = 8
    seed: int = 0
    group_size: int = 32
    observer: str = "percentile"
    percentile: float = 99.99
    min_elements: int = 2048
    inputs: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)
    name = "quantize"
    level = 1

    def check(self) -> None:
        """Raise SnapcError when the scheme and its budget do not go together (see
        :func:`check_scheme`); :meth:`run` checks the same."""
        check_scheme(self.scheme, self.size_mb, self.psnr_floor_db)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Return the graph with its records in ``graph.quant`` (program unchanged) and one
        Change per new record; ``info["records"]`` summarises them for the manifest."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "scheme"}
        records, info = quantize_records(graph, self.scheme, **params)
        old = quant_records(graph)
        changes = _changes(graph, old, records)
        graph = dataclasses.replace(graph, quant={**old, **records}) if changes else graph
        info["records"] = records_summary(records)
        return PassResult(graph, tuple(changes), info)
