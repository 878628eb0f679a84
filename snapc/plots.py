"""PNG plots of latency tables (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from snapc.artifacts import atomic_output_file
from snapc.cost.table import LatencyTable

__all__ = ["plot_block_latency", "plot_predicted_vs_measured", "save_figure"]

_STAGE_ORDER = ("down", "mid", "up")


def save_figure(fig: object, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (creating folders), close it; return path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_output_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _stage_rank(stage: str) -> tuple[int, str]:
    head = stage.split(".", 1)[0]
    return (_STAGE_ORDER.index(head) if head in _STAGE_ORDER else len(_STAGE_ORDER), stage)


def plot_block_latency(table: LatencyTable, path: str | Path, title: str | None = None) -> Path:
    """Write a bar chart of each block's share of block latency next to its share of block
    MACs, blocks grouped by stage in graph order (the SnapFusion per-block breakdown).
    Error bars show the 10th-90th percentile of the latency samples. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = sorted(table.blocks, key=lambda b: _stage_rank(b.stage))
    latency = np.array([b.timing.median_ms for b in blocks])
    low = latency - np.array([b.timing.p10_ms for b in blocks])
    high = np.array([b.timing.p90_ms for b in blocks]) - latency
    macs = np.array([b.macs for b in blocks], dtype=float)
    lat_total, macs_total = latency.sum() or 1.0, macs.sum() or 1.0
    x = np.arange(len(blocks))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.38 * len(blocks) + 2), 5.2))
    width = 0.4
    ax.bar(x - width / 2, 100 * latency / lat_total, width, label="latency share",
           yerr=(100 * np.vstack([low, high]) / lat_total).tolist(), color="#d95f02",
           capsize=2)
    ax.bar(x + width / 2, 100 * macs / macs_total, width, label="MACs share", color="#7570b3")
    for i, block in enumerate(blocks):
        top = 100 * (latency[i] + high[i]) / lat_total  # above the error bar
        ax.annotate(f"{block.timing.median_ms:.3g} ms", (x[i] - width / 2, top), ha="center",
                    va="bottom", fontsize=6, rotation=90)
    stages = [b.stage for b in blocks]
    starts = [i for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="grey", linewidth=0.6, linestyle=":")
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(stages)
        ax.text((i + end - 1) / 2, 1.0, stages[i], ha="center", va="bottom",
                transform=ax.get_xaxis_transform(), fontsize=8)
    short = [b.name.replace("_blocks.", "").replace("attentions.", "attn")
             .replace("resnets.", "res").replace("mid_block.", "mid.") for b in blocks]
    ax.set_xticks(x, short, rotation=90, fontsize=7)
    ax.set_ylabel("% of all blocks")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    whole = f", whole model {table.whole_model.median_ms:.4g} ms" if table.whole_model else ""
    ax.set_title(title or f"{table.model_name} on {table.device} ({table.backend}): "
                 f"blocks {table.sum_blocks_ms():.4g} ms{whole}", fontsize=9, pad=16)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_predicted_vs_measured(series: Mapping[str, tuple[list[float], list[float]]],
                               path: str | Path, title: str) -> Path:
    """Write a log-log scatter of predicted vs measured ms, one colour per predictor in
    ``series`` ({label: (measured, predicted)}), with the y = x line. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    values: list[float] = []
    for label, (measured, predicted) in series.items():
        ax.scatter(measured, predicted, s=14, label=label, alpha=0.8)
        values += list(measured) + list(predicted)
    lo, hi = min(values) * 0.8, max(values) * 1.25
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
