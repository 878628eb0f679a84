"""`snapc profile` and `snapc cost`: typer commands registered by ``snapc/cli.py``.

They parse arguments, build options, call ``snapc.profile`` / ``snapc.cost`` and print; nothing
else. Errors are SnapcError one-liners with exit code 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from snapc.cli_common import ModelArg, err, fail, out, show_warnings
from snapc.errors import SnapcError

__all__ = ["profile_command", "cost_command"]


def profile_command(
    model: ModelArg,
    backend: Annotated[str, typer.Option(help="torch, onnxruntime, tvm or coreml")] = "torch",
    device: Annotated[str, typer.Option(help="cpu or cuda (torch, onnxruntime)")] = "cpu",
    rpc: Annotated[str | None, typer.Option(help="TVM RPC server HOST:PORT (--backend tvm)")]
    = None,
    target: Annotated[str | None, typer.Option(
        help="snapc TVM target for --backend tvm: x86, arm-cpu, cuda, mali, adreno")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="latency table JSON to write "
                                         "(the PNG chart goes next to it)")]
    = Path("latency_table.json"),
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per block (median)")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="untimed runs per block first")] = 2,
    device_name: Annotated[str | None, typer.Option(
        help="device the table is for (default local-cpu, h100, tvm-TARGET)")] = None,
    block: Annotated[list[str] | None, typer.Option(
        "--block", help="profile only this block (repeatable)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads while timing")]
    = None,
    clock: Annotated[str, typer.Option(
        help="wall, or cpu: the thread's CPU time (torch, --device cpu --threads 1; steadier "
             "on a shared machine)")] = "wall",
    cuda_graphs: Annotated[bool, typer.Option(
        help="torch --device cuda: time each block as a captured CUDA graph (GPU time, no "
             "per-op Python dispatch)")] = False,
    rpc_timeout: Annotated[float, typer.Option(help="seconds to wait for the RPC server")]
    = 10.0,
    latent: Annotated[int | None, typer.Option(help="latent height/width (default: config)")]
    = None,
    batch: Annotated[int, typer.Option(min=1, help="batch size")] = 1,
    arch: Annotated[str | None, typer.Option(help="architecture of a bare weights file")]
    = None,
) -> None:
    """Time every block of MODEL in isolation and the whole model; write a latency table."""
    from snapc.compiler import load_graph
    from snapc.plots import plot_block_latency
    from snapc.profile import ProfileOptions, make_timer, profile_graph

    options = ProfileOptions(backend=backend, device=device, repeats=repeats, warmup=warmup,
                             rpc=rpc, target=target, device_name=device_name,
                             blocks=tuple(block) if block else None, threads=threads, clock=clock,
                             rpc_timeout_s=rpc_timeout,
                             min_sample_ms=5.0 if device == "cuda" else 0.0,
                             cuda_graphs=cuda_graphs)
    try:
        timer = make_timer(options)  # fails fast: missing backend, RPC host not answering
        with err.status(f"loading and tracing {model}"):
            # exported graphs bake in devices: trace on the device torch will time on
            on = device if backend == "torch" else "cpu"
            graph = load_graph(model, arch=arch, batch=batch, latent=latent, device=on)
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err) as bar:
            task = bar.add_task("profiling", total=1)

            def progress(label: str, done: int, total: int) -> None:
                bar.update(task, description=label, completed=done, total=total)

            table = profile_graph(graph, options, progress, timer=timer)
    except SnapcError as exc:
        fail(exc)
    table.write(output)
    chart = plot_block_latency(table, output.with_suffix(".png"))
    view = Table(title=f"snapc profile {model} ({table.backend}, {table.device})")
    for col in ("block", "stage", "median ms", "p10-p90 ms", "GMACs"):
        view.add_column(col, justify="right" if col != "block" else "left")
    for entry in table.blocks:
        view.add_row(entry.name, entry.stage, f"{entry.timing.median_ms:.3f}",
                     f"{entry.timing.p10_ms:.3f}-{entry.timing.p90_ms:.3f}",
                     f"{entry.macs / 1e9:.3f}")
    out.print(view)
    out.print(f"sum of blocks {table.sum_blocks_ms():.3f} ms")
    if table.whole_model is not None:
        out.print(f"whole model {table.whole_model.median_ms:.3f} ms; non-block cost "
                  f"{table.non_block_ms():.3f} ms (kept in the table)")
    out.print(f"wrote {output} and {chart}")


def cost_command(
    model: ModelArg,
    device: Annotated[str, typer.Option(help="built-in profile name or a .toml/.json file")]
    = "local-cpu",
    table: Annotated[Path | None, typer.Option(help="latency table measured on DEVICE")]
    = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, fp16 or int8 (default: graph's)")]
    = None,
    latent: Annotated[int | None, typer.Option(help="latent height/width (default: config)")]
    = None,
    batch: Annotated[int, typer.Option(min=1, help="batch size")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
) -> None:
    """Estimate MODEL's latency on DEVICE per block (measured, fitted or analytic)."""
    from snapc.compiler import load_graph
    from snapc.cost import CostModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cost = CostModel(device, table=table, dtype=dtype)
            meta = model in ("sd15", "sd21-base", "tiny")
            graph = load_graph(model, batch=batch, latent=latent,
                               device="meta" if meta else "cpu")
            estimate = cost.estimate_graph(graph)
            savings = {b.name: cost.saving_ms(graph, b) for b in graph.blocks}
        show_warnings(caught)
    except SnapcError as exc:
        fail(exc)
    if as_json:
        data = estimate.to_json()
        data["saving_ms"] = savings
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    view = Table(title=f"snapc cost {model} on {cost.device.name} ({estimate.dtype})")
    for col in ("block", "ms", "source", "saving if removed ms", "GMACs"):
        view.add_column(col, justify="left" if col in ("block", "source") else "right")
    for name, item in estimate.per_block.items():
        view.add_row(name, f"{item.ms:.3f}", item.source, f"{savings[name]:.3f}",
                     f"{graph.blocks[name].macs / 1e9:.3f}")
    view.add_row("(non-block)", f"{estimate.non_block_ms:.3f}", estimate.non_block_source,
                 "", "")
    out.print(view)
    out.print(f"total {estimate.total_ms:.3f} ms per UNet evaluation on {cost.device.name}")
