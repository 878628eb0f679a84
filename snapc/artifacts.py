"""Write artifacts atomically: build in a temp file or folder beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapc.errors import OutputExistsError

__all__ = ["atomic_output_dir", "atomic_output_file", "check_output_dir"]


def check_output_dir(out_dir: str | Path, force: bool) -> Path:
    """Return ``out_dir`` as a Path; raise OutputExistsError if it exists and not ``force``."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another -o path")
    return out


@contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out_dir``, on failure it is deleted.

    The temp folder sits beside ``out_dir`` so the final rename stays on one file system.
    """
    out = check_output_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside ``path``; on success it replaces ``path``, on failure it
    is deleted, so a reader never sees a half-written file (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix,
                                    dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
