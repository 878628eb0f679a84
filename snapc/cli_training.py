"""What every training command shares: the progress bar and the run wrapper.

``snapc distill`` (recovery and step distillation) and ``snapc compress-decoder`` run their
jobs through :func:`run_training`: checks before any long work, a rich bar per training phase
with the loss and the time left, one-line errors, the random-weights warning, ``--json``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from snapc.cli_common import err, fail, out, show_warnings
from snapc.errors import SnapcError

__all__ = ["TrainBar", "run_training"]


class TrainBar:
    """A rich progress bar per training phase: step, loss and time left."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
            TextColumn("left {task.fields[left]}"), console=err, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> TrainBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage(self, message: str) -> None:
        """Print a stage line above the bars."""
        self.progress.console.print(f"[green]•[/] {message}")

    def update(self, phase: str, p) -> None:
        """Advance ``phase``'s bar to the reported step."""
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=p.total_steps, loss="-",
                                                       left="?")
        left = "?" if p.eta_s is None else f"{int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}"
        self.progress.update(self.tasks[phase], completed=p.step, loss=f"{p.loss:.5f}",
                             left=left)


def run_training(checks: Callable[[], None], job: Callable[..., dict],
                 json_out: bool) -> dict | None:
    """Run ``checks`` then ``job(progress, report)`` under the training progress bar.

    A SnapcError is printed as one `error:` line and exits; random-weight runs say they are
    smoke tests; ``json_out`` prints the record. Returns the record for the caller to
    summarise, or None when there is nothing more to print (a non-main torchrun rank, --json).
    """
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            checks()
            with TrainBar() as bar:
                record = job(bar.update if main else None,
                             bar.stage if main else lambda _: None)
        show_warnings([w for w in caught if "random weights" in str(w.message)])
    except SnapcError as exc:
        fail(exc)
    if not main:
        return None
    if record.get("random_weights"):
        err.print("[yellow]warning:[/] the model has random weights: this run is a smoke test "
                  "of the training path, not a quality result")
    if json_out:
        out.print_json(json.dumps(record, default=str))
        return None
    return record
