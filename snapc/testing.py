"""Checks for tests of snapc's command line (and of commands built on it)."""

from __future__ import annotations

from typing import Any

__all__ = ["one_error_line"]


def one_error_line(run: Any, stream: str = "output") -> str:
    """Return the single ``error:`` line of a failed command, asserting snapc's contract for
    bad input: exit code 2, exactly one such line, no traceback.

    ``run`` is a typer/click ``CliRunner`` result (``stream`` picks ``output`` or ``stderr``)
    or a ``subprocess.CompletedProcess`` (its stderr is read).
    """
    if hasattr(run, "returncode"):
        text, code = run.stderr, run.returncode
    else:
        text, code = getattr(run, stream), run.exit_code
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, text
    assert "Traceback" not in text, text
    return lines[0]
