"""Latency cost model: device profiles, per-node roofline, measured tables and fitting.

Typical use::

    model = CostModel("adreno740", dtype="fp16")          # analytic
    model = CostModel("local-cpu", table="table.json")    # measured where it matches, fitted
    model.estimate_graph(graph).total_ms
    model.saving_ms(graph, "up_blocks.1.attentions.2")    # what removing a block saves
"""

from snapc.cost.device import DeviceError, DeviceProfile, builtin_devices, load_device
from snapc.cost.fitting import fit
from snapc.cost.model import (
    ANALYTIC,
    FITTED,
    MEASURED,
    CostModel,
    Estimate,
    ModelEstimate,
    TableMismatchWarning,
    block_work,
    graph_signature,
    non_block_work,
)
from snapc.cost.table import BlockEntry, LatencyTable, TableError, Timing, summarize
from snapc.cost.work import NodeWork, node_work

__all__ = [
    "ANALYTIC",
    "FITTED",
    "MEASURED",
    "BlockEntry",
    "CostModel",
    "DeviceError",
    "DeviceProfile",
    "Estimate",
    "LatencyTable",
    "ModelEstimate",
    "NodeWork",
    "TableError",
    "TableMismatchWarning",
    "Timing",
    "block_work",
    "builtin_devices",
    "fit",
    "graph_signature",
    "load_device",
    "node_work",
    "non_block_work",
    "summarize",
]
