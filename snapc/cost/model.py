"""The cost model: latency per FX node, per block and per model on one device.

Each number says where it came from:

- ``measured``: a latency table entry whose block signature (and dtype, batch) matches;
- ``fitted``: the roofline with efficiencies least-squares fitted to that device's table;
- ``analytic``: the roofline with the profile's prior efficiencies (no table).

The cost model is pure: it reads graphs and never changes them. ``saving_ms`` answers the
block search's question "how much latency does removing block B save on this device".
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx

from snapc.blocks import Block
from snapc.cost.device import DeviceProfile, load_device
from snapc.cost.fitting import fit
from snapc.cost.roofline import node_seconds
from snapc.cost.table import LatencyTable, TableError, model_signature
from snapc.cost.work import NodeWork, dtype_key, node_work
from snapc.graph import Graph

__all__ = ["CostModel", "Estimate", "ModelEstimate", "TableMismatchWarning", "MEASURED",
           "FITTED", "ANALYTIC", "graph_signature", "graph_dtype", "block_work",
           "non_block_work", "TORCH_DTYPE_NAMES"]

MEASURED, FITTED, ANALYTIC = "measured", "fitted", "analytic"
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


class TableMismatchWarning(UserWarning):
    """A latency table measured on another model: only matching block signatures are used."""


@dataclass(frozen=True)
class Estimate:
    """Latency of one block (or node group) in ms and which of the three sources gave it."""

    ms: float
    source: str

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"ms": self.ms, "source": self.source}


@dataclass(frozen=True)
class ModelEstimate:
    """Latency of a whole graph: total, per block, and the cost outside blocks."""

    device: str
    dtype: str
    total_ms: float
    per_block: Mapping[str, Estimate]
    non_block_ms: float
    non_block_source: str
    notes: tuple[str, ...] = field(default=())

    def blocks_ms(self) -> float:
        """Return the sum of the per-block estimates."""
        return sum(e.ms for e in self.per_block.values())

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"device": self.device, "dtype": self.dtype, "total_ms": self.total_ms,
                "blocks_ms": self.blocks_ms(), "non_block_ms": self.non_block_ms,
                "non_block_source": self.non_block_source,
                "per_block": {k: v.to_json() for k, v in self.per_block.items()},
                "notes": list(self.notes)}


def graph_dtype(graph: Graph) -> str:
    """Return the compute dtype key (fp32/fp16/int8) of a graph: its sample input's dtype."""
    return dtype_key(graph.example_inputs[0].dtype)


def graph_signature(graph: Graph, dtype: str | None = None) -> str:
    """Return the model signature of ``graph`` (config, input shapes, dtype; not removals)."""
    dtype = dtype or graph_dtype(graph)
    shapes = [tuple(t.shape) for t in graph.example_inputs]
    fallback = [b.name for b in graph.blocks]
    return model_signature(graph.source.config, shapes, dtype, fallback)


_NODE_MAPS: weakref.WeakKeyDictionary[fx.Graph, dict[str, fx.Node]] = \
    weakref.WeakKeyDictionary()


def _nodes_by_name(graph: Graph) -> dict[str, fx.Node]:
    fx_graph = graph.fx
    found = _NODE_MAPS.get(fx_graph)
    if found is None:
        found = {n.name: n for n in fx_graph.nodes}
        _NODE_MAPS[fx_graph] = found
    return found


def quantized_inputs(graph: Graph) -> tuple[dict[str, int], frozenset[str]]:
    """Return what the graph's quantization records (``Graph.quant``) change for the roofline:
    {weight placeholder name: stored bits} and the nodes computing in int8 (w8a8 layers)."""
    records = getattr(graph, "quant", None) or {}
    if not records:
        return {}, frozenset()
    nodes = _nodes_by_name(graph)
    prefix = f"{graph.root}."
    bits: dict[str, int] = {}
    int8: set[str] = set()
    for placeholder, target in graph.program.graph_signature.inputs_to_parameters.items():
        record = records.get(target.removeprefix(prefix))
        if record is None or "bits" not in record:
            continue
        bits[placeholder] = int(record["bits"])
        if record.get("scheme") == "w8a8" and placeholder in nodes:
            int8.update(user.name for user in nodes[placeholder].users)
    return bits, frozenset(int8)


def _work(graph: Graph, names: Iterable[str], dtype: str | None) -> list[NodeWork]:
    nodes = _nodes_by_name(graph)
    bits, int8 = quantized_inputs(graph)
    found = (node_work(nodes[name], dtype, bits, int8) for name in names if name in nodes)
    return [w for w in found if w is not None]


def block_work(graph: Graph, block: Block, dtype: str | None = None) -> list[NodeWork]:
    """Return the roofline work of ``block``'s nodes in ``graph`` (views included; quantized
    weights at their stored size, see :func:`quantized_inputs`)."""
    return _work(graph, block.nodes, dtype)


def non_block_work(graph: Graph, dtype: str | None = None) -> list[NodeWork]:
    """Return the roofline work of every node outside the graph's blocks."""
    inside = {name for block in graph.blocks for name in block.nodes}
    return _work(graph, (n.name for n in graph.fx.nodes if n.name not in inside), dtype)


def _shortcut_names(block: Block, nodes: Mapping[str, fx.Node]) -> list[str]:
    """Return the block's nodes that survive its removal: the shortcut path (a ResNet's
    conv_shortcut and what feeds it inside the block)."""
    if not block.shortcut or block.shortcut not in nodes:
        return []
    members, keep, frontier = set(block.nodes), [], [nodes[block.shortcut]]
    while frontier:
        node = frontier.pop()
        if node.name in members and node.name not in keep:
            keep.append(node.name)
            frontier.extend(node.all_input_nodes)
    return keep


class CostModel:
    """Latency estimates for graphs on one device, from a table where it matches.

    ``device`` is a DeviceProfile or a name/file for :func:`load_device`. ``table`` is a
    LatencyTable (or its path) measured on that device: matching blocks use it directly and
    the rest use efficiencies fitted to it. ``dtype`` (fp32/fp16/int8) overrides the graph's
    dtype, e.g. fp16 for phones. Raises TableError when the table is for another device.
    """

    def __init__(self, device: DeviceProfile | str | Path,
                 table: LatencyTable | str | Path | None = None,
                 dtype: str | None = None) -> None:
        self.device = device if isinstance(device, DeviceProfile) else load_device(device)
        if table is not None and not isinstance(table, LatencyTable):
            table = LatencyTable.read(table)
        if table is not None and table.device != self.device.name:
            raise TableError(f"latency table was measured on '{table.device}', not "
                             f"'{self.device.name}'; pass a table for {self.device.name} or "
                             f"--device {table.device}")
        self.table = table
        self.dtype = dtype_key(dtype) if dtype else None
        has_work = table is not None and any(b.work for b in table.blocks)
        self.profile = fit(self.device, table) if has_work else self.device
        self._warned: set[str] = set()

    @property
    def model_source(self) -> str:
        """Return the source of non-measured numbers: fitted with a table, else analytic."""
        return FITTED if self.profile is not self.device else ANALYTIC

    def _dtype(self, graph: Graph | None) -> str:
        if self.dtype:
            return self.dtype
        return graph_dtype(graph) if graph is not None else "fp32"

    def _table_matches_model(self, graph: Graph, dtype: str) -> bool:
        if self.table is None:
            return False
        if self.table.model_signature == graph_signature(graph, dtype):
            return True
        key = f"{graph.source.name}:{graph_signature(graph, dtype)}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"latency table '{self.table.model_name}' ({self.table.model_signature}) was "
                f"measured on another model signature than '{graph.source.name}' "
                f"({graph_signature(graph, dtype)}); using only block entries whose signature "
                "matches, the rest is fitted", TableMismatchWarning, stacklevel=3)
        return False

    def estimate_node(self, node: fx.Node, dtype: str | None = None) -> float:
        """Return the estimated ms of one FX node (0 for views and fused epilogues)."""
        work = node_work(node, dtype_key(dtype) if dtype else self.dtype)
        use = dtype_key(dtype) if dtype else (self.dtype or dtype_key(
            getattr(node.meta.get("val"), "dtype", "float32")))
        return 0.0 if work is None else node_seconds(work, self.profile, use) * 1e3

    def estimate_work(self, work: list[NodeWork], dtype: str = "fp32") -> float:
        """Return the estimated ms of a list of node work items."""
        return sum(node_seconds(w, self.profile, dtype) for w in work) * 1e3

    def estimate_block(self, block: Block | str, graph: Graph) -> Estimate:
        """Return the latency of ``block`` (a Block or its name) in ``graph``: the measured
        entry when the table has its signature at this dtype, else the (fitted) roofline."""
        block = graph.blocks[block] if isinstance(block, str) else block
        dtype = self._dtype(graph)
        if self.table is not None and not quantized_inputs(graph)[0]:  # measured unquantized
            self._table_matches_model(graph, dtype)
            measured = self.table.lookup(block.signature(TORCH_DTYPE_NAMES[dtype]))
            if measured is not None:
                return Estimate(measured, MEASURED)
        work = block_work(graph, block, self.dtype)
        return Estimate(self.estimate_work(work, dtype), self.model_source)

    def estimate_graph(self, graph: Graph) -> ModelEstimate:
        """Return the latency of the whole graph: every block plus the non-block nodes (from
        the table's whole-model measurement when its model signature matches)."""
        dtype = self._dtype(graph)
        per_block = {b.name: self.estimate_block(b, graph) for b in graph.blocks}
        notes: list[str] = []
        measured_rest = self.table.non_block_ms() if self.table is not None else None
        if measured_rest is not None and self._table_matches_model(graph, dtype):
            rest, rest_source = measured_rest, MEASURED
            if graph.removed:
                notes.append("non-block cost measured on the unpruned model")
        else:
            rest = self.estimate_work(non_block_work(graph, self.dtype), dtype)
            rest_source = self.model_source
        total = sum(e.ms for e in per_block.values()) + rest
        return ModelEstimate(self.device.name, dtype, total, per_block, rest, rest_source,
                             tuple(notes))

    def saving_ms(self, graph: Graph, block: Block | str) -> float:
        """Return the ms saved by removing ``block`` from ``graph``: its estimate minus the
        shortcut path that replaces it (a ResNet's conv_shortcut). Cheap: one block's nodes."""
        block = graph.blocks[block] if isinstance(block, str) else block
        nodes = _nodes_by_name(graph)
        dtype = self._dtype(graph)
        shortcut = self.estimate_work(_work(graph, _shortcut_names(block, nodes), self.dtype),
                                      dtype)
        return max(self.estimate_block(block, graph).ms - shortcut, 0.0)
