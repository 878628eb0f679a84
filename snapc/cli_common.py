"""What every `snapc` command shares: the consoles, the MODEL argument and one-line errors."""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from snapc.errors import SnapcError

__all__ = ["out", "err", "ModelArg", "fail", "show_warnings", "TrainDeviceOpt", "TrainBatchOpt",
           "LrOpt", "WarmupOpt", "EmaOpt", "CheckpointEveryOpt", "ResumeOpt", "ForceOpt"]

# Tables are wide: keep 160 columns when output goes to a file or pipe (rich's default is 80).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(
    help="registered name (sd15, sd21-base, sdxl, tiny, shapes; see `snapc models`), a "
         "diffusers UNet or pipeline folder, an original SD checkpoint (.safetensors), or a "
         ".safetensors file with --arch")]


# Options the training commands (distill, compress-decoder) share; each gives its own default.
TrainDeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]
TrainBatchOpt = Annotated[int, typer.Option(help="global batch (split over torchrun processes)")]
LrOpt = Annotated[float, typer.Option(help="AdamW learning rate")]
WarmupOpt = Annotated[int, typer.Option(help="linear warm-up steps")]
EmaOpt = Annotated[float, typer.Option(help="EMA decay of the weights written")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="steps between checkpoints")]
ResumeOpt = Annotated[bool, typer.Option(
    help="continue a killed run from its last checkpoint (<out>.checkpoints)")]
ForceOpt = Annotated[bool, typer.Option(help="replace an existing output folder")]


def fail(exc: SnapcError) -> NoReturn:
    """Print ``exc`` as one `error:` line on stderr and exit with its code (2 by default)."""
    err.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
    raise typer.Exit(exc.exit_code)


def show_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print each caught warning as one `warning:` line on stderr."""
    for item in caught:
        err.print(f"[yellow]warning:[/] {item.message}", soft_wrap=True, highlight=False)
