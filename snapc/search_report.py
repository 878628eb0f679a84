"""Show a block-search record: a rich table per block and a PNG of the latency/quality front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from snapc.plots import save_figure

__all__ = ["search_table", "front_table", "plot_front"]


def search_table(record: Mapping[str, Any]) -> Table:
    """Return a rich Table: every block's latency, MACs, quality cost and whether it went."""
    table = Table(title=f"block search on {record['device']}: {record['original_ms']:.2f} ms → "
                  f"{record['final_ms']:.2f} ms ({record['stop']})")
    for col in ("block", "kind", "stage", "latency ms", "saves ms", "MACs", "quality cost",
                "removed"):
        table.add_column(col, justify="left" if col in ("block", "kind", "stage") else "right")
    order = {name: i for i, name in enumerate(record["chosen"])}
    for row in record["blocks"]:
        cost = row["quality_cost"]
        removed = f"step {order[row['name']] + 1}" if row["removed"] else (
            "pinned" if row["pinned"] else "")
        table.add_row(row["name"], row["kind"], row["stage"],
                      f"{row['latency_ms']:.3f} ({row['latency_source'][0]})",
                      "" if row["saving_ms"] is None else f"{row['saving_ms']:.3f}",
                      f"{row['macs'] / 1e6:.1f} M", "" if cost is None else f"{cost:.4f}",
                      removed)
    table.caption = (f"latency source: m=measured f=fitted a=analytic · metric {record['metric']}"
                     f" · {record['seconds']:.1f} s")
    return table


def front_table(record: Mapping[str, Any]) -> Table:
    """Return a rich Table of the front: latency and quality loss after each removal."""
    table = Table(title="front (latency vs quality loss)")
    for col in ("step", "removed block", "latency ms", "quality loss"):
        table.add_column(col)
    for i, step in enumerate(record["front"]):
        table.add_row(str(i), step["chosen"] or "(original)", f"{step['latency_ms']:.3f}",
                      f"{step['quality_loss']:.4f}")
    return table


def plot_front(records: Mapping[str, Mapping[str, Any]] | Mapping[str, Any], path: str | Path,
               points: Sequence[tuple[str, float, float]] = ()) -> Path:
    """Write a PNG of latency (x) vs quality loss (y) for one or several search records
    ({label: record}), plus labelled single ``points`` (label, latency, loss). Returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "front" in records:
        records = {"snapc search": records}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, record in records.items():
        xs = [s["latency_ms"] for s in record["front"]]
        ys = [s["quality_loss"] for s in record["front"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if record.get("target_ms"):
            ax.axvline(record["target_ms"], color="grey", linestyle=":", linewidth=1)
    for label, x, y in points:
        ax.scatter([x], [y], marker="x", s=50, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    first = next(iter(records.values()))
    ax.set_xlabel(f"predicted latency on {first['device']} (ms)")
    ax.set_ylabel(f"quality loss ({first['metric']})")
    ax.set_title("block removal front: each point is one more block removed")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
