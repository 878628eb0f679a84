"""User-facing errors: each carries a one-line message that names the fix."""

from __future__ import annotations

__all__ = [
    "SnapcError",
    "UnknownNameError",
    "WeightsError",
    "OutputExistsError",
    "VerificationError",
    "UnsupportedOpsError",
    "BudgetError",
    "ToolMissingError",
    "TraceError",
]


class SnapcError(Exception):
    """Base class for errors the CLI reports as one line and exit code 2."""

    exit_code = 2


class UnknownNameError(SnapcError):
    """A model, target, pass, device or block name that does not exist."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        shown = ", ".join(sorted(valid)[:40])
        more = "" if len(valid) <= 40 else f", ... ({len(valid)} in all)"
        super().__init__(f"unknown {kind} '{name}'; valid {kind}s: {shown}{more}")
        self.kind, self.name, self.valid = kind, name, list(valid)


class WeightsError(SnapcError):
    """Missing, corrupt or mismatched weight files."""


class OutputExistsError(SnapcError):
    """The output folder exists and --force was not given."""


class VerificationError(SnapcError):
    """An artifact's numerics did not match PyTorch within the stated tolerance."""

    exit_code = 3


class UnsupportedOpsError(SnapcError):
    """A target met operators it cannot lower; lists every offending node."""

    def __init__(self, target: str, nodes: list[tuple[str, str]]) -> None:
        listed = "; ".join(f"{op} at {where}" for op, where in nodes[:20])
        more = "" if len(nodes) <= 20 else f"; ... ({len(nodes)} in all)"
        super().__init__(
            f"target '{target}' cannot lower {len(nodes)} node(s): {listed}{more}; "
            "remove or rewrite them with a pass before this target"
        )
        self.target, self.nodes = target, nodes


class BudgetError(SnapcError):
    """A latency or size budget that no allowed choice can meet."""


class ToolMissingError(SnapcError):
    """An optional dependency or external tool (compiler, runtime) is missing."""


class TraceError(SnapcError):
    """A model that torch.export cannot trace; names the module (class and path) that failed."""
