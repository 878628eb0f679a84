"""Training checkpoints: whole training states, written atomically, the last ones kept.

A checkpoint is ``step-NNNNNNN.pt`` in a run's checkpoint folder: the student, EMA and
optimizer states, the step, the training seconds so far, the loss history and the options it
was started with. Batches are drawn from generators seeded by (seed, step), so a run resumed
from step k draws exactly the batches an uninterrupted run draws from step k on. Each file is
written to a temporary name and renamed, so a kill mid-write leaves the previous checkpoint
intact; the oldest are deleted only after a new one is in place.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from snapc.errors import SnapcError

__all__ = ["CheckpointError", "save_checkpoint", "latest_checkpoint", "load_checkpoint",
           "list_checkpoints"]

_NAME = re.compile(r"^step-(\d{7,})\.pt$")


class CheckpointError(SnapcError):
    """A checkpoint is missing, corrupt or from a different run."""


def list_checkpoints(folder: Path) -> list[Path]:
    """Return the folder's checkpoint files, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; keep the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=folder)
    os.close(handle)
    try:
        torch.save(state, name)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
    for old in list_checkpoints(folder)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    """Return the newest checkpoint file of the folder, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Return the state saved at ``path``; CheckpointError names a corrupt file and the fix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises several unrelated types on damaged files
        raise CheckpointError(
            f"corrupt checkpoint {path} ({str(exc).splitlines()[0][:120]}); delete it to "
            "resume from the one before, or start again without --resume") from exc
    if not isinstance(state, dict) or "step" not in state or "student" not in state:
        raise CheckpointError(f"{path} is not a snapc training checkpoint; delete it")
    return state
