"""The block report behind `snapc inspect`: a JSON-ready dict and a rich table of it."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from snapc.graph import Graph

__all__ = ["block_report", "render_block_table"]


def block_report(graph: Graph) -> dict[str, Any]:
    """Return the block map of ``graph`` and its totals as a JSON-ready dict."""
    blocks = list(graph.blocks)
    macs = graph.macs_by_class()
    total_macs = sum(macs.values())
    counts = graph.blocks.counts()
    return {
        "model": graph.source.name,
        "random_weights": graph.source.random_weights,
        "inputs": {n: list(t.shape) for n, t in zip(graph.input_names, graph.example_inputs,
                                                     strict=True)},
        "totals": {
            "params": graph.param_count(),
            "macs": total_macs,
            "macs_conv_linear": macs.get("conv", 0) + macs.get("linear", 0),
            "macs_by_class": macs,
            "resnet_blocks": counts.get("resnet", 0),
            "transformer_blocks": counts.get("transformer", 0),
            "block_params": sum(b.params for b in blocks),
            "block_macs": sum(b.macs for b in blocks),
            "fx_nodes": len(graph.fx.nodes),
        },
        "removed": list(graph.removed),
        "not_blocks": list(graph.blocks.uncovered),
        "blocks": [b.to_json() for b in blocks],
    }


def _g(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render_block_table(report: dict[str, Any]) -> Table:
    """Return a rich Table of the report's blocks with a totals caption."""
    totals = report["totals"]
    table = Table(title=f"{report['model']}: {totals['resnet_blocks']} ResNet + "
                  f"{totals['transformer_blocks']} transformer blocks")
    for col in ("block", "kind", "stage", "res", "ch in→out", "seq×ctx", "params", "MACs",
                "attn MACs", "removable"):
        table.add_column(col, justify="right" if col in ("params", "MACs", "attn MACs") else "left")
    for b in report["blocks"]:
        seq = f"{b['seq_len']}×{b['context_len']}" if b["seq_len"] else ""
        table.add_row(b["name"], b["kind"], b["stage"], "x".join(map(str, b["resolution"])),
                      f"{b['in_channels']}→{b['out_channels']}", seq, f"{b['params']:,}",
                      _g(b["macs"]), _g(b["attention_macs"]),
                      "yes" if b["removable"] else f"no: {b['reason']}")
    macs = totals["macs_by_class"]
    table.caption = (
        f"params {totals['params']:,} (blocks {totals['block_params']:,}) · MACs "
        f"{_g(totals['macs'])} (conv+linear {_g(totals['macs_conv_linear'])}, attention "
        f"{_g(macs.get('attention', 0))}) · not blocks: {', '.join(report['not_blocks'])}"
    )
    return table
