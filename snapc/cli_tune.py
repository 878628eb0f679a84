"""`snapc tune`: a typer command registered by ``snapc/cli.py``.

It parses arguments, calls :func:`snapc.tune.tune_model` and prints; nothing else. Errors are
SnapcError one-liners with exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from snapc.cli_common import ModelArg, err, fail, out
from snapc.errors import SnapcError

__all__ = ["tune_command"]


def tune_command(
    model: ModelArg,
    target: Annotated[str, typer.Option("--target", "-t", help="TVM target: x86 here; cuda, "
                                        "arm-cpu, mali, adreno through --rpc")],
    output: Annotated[Path, typer.Option("--output", "-o", help="records folder to create, or "
                                         "one of the same target and device to extend")],
    trials: Annotated[int, typer.Option(help="measured candidates over all kernels")] = 64,
    trials_per_task: Annotated[int | None, typer.Option(
        help="most candidates for one kernel (default: --trials)")] = None,
    max_kernels: Annotated[int | None, typer.Option(
        help="tune only the N heaviest kernels not yet in the records (FLOPs x uses)")] = None,
    trials_per_round: Annotated[int, typer.Option(
        help="candidates measured per search round (one kernel per round)")] = 16,
    build_workers: Annotated[int, typer.Option(
        help="candidates compiled at once (more on a many-core machine)")] = 1,
    rpc: Annotated[str | None, typer.Option(
        help="TVM RPC tracker HOST:PORT whose servers measure (needs --device-key)")] = None,
    device_key: Annotated[str | None, typer.Option(
        help="key the device's RPC servers registered with the tracker")] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp16 or fp32 (default: the target's, as snapc compile)")] = None,
    mcpu: Annotated[str | None, typer.Option(
        help="cpu targets: LLVM CPU (native: this machine's); compile with the same")] = None,
    batch: Annotated[int, typer.Option(min=1, help="batch size of the traced UNet")] = 1,
    latent: Annotated[int | None, typer.Option(help="latent height/width")] = None,
    arch: Annotated[str | None, typer.Option(help="architecture of a bare weights file")]
    = None,
    seed: Annotated[int, typer.Option(help="seed of the weights, inputs and search")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Tune MODEL's kernels with MetaSchedule for a TVM target; apply with `snapc compile
    --tuning`."""
    from snapc.tune import TuneOptions, tune_model

    options = TuneOptions(model=model, target=target, out=output, trials=trials,
                          trials_per_task=trials_per_task, trials_per_iter=trials_per_round,
                          max_kernels=max_kernels, precision=precision, mcpu=mcpu,
                          rpc=rpc, device_key=device_key, batch=batch, latent=latent,
                          arch=arch, seed=seed, build_workers=build_workers)
    try:
        with err.status("tuning") as status:
            result = tune_model(options, progress=lambda text: status.update(text))
    except SnapcError as exc:
        fail(exc)
    tasks = result.summary["tasks"]
    row = {"records": str(result.out), "target": target, "device": options.device,
           "tasks": len(tasks), "reused": sum(t["reused"] for t in tasks),
           "tuned": sum(1 for t in tasks if not t["reused"] and t["best_us"] is not None),
           "workloads": result.index["workloads"], "tuning_records": result.index["records"],
           "cost_model": result.summary["cost_model"], "seconds": round(result.seconds, 1)}
    if as_json:
        sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table(title=f"snapc tune {model} → {target}", show_header=False)
    for key, value in row.items():
        table.add_row(key, str(value))
    out.print(table)
    out.print(f"apply with: snapc compile {model} --target {target} --tuning {result.out}",
              highlight=False)
