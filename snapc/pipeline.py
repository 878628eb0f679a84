"""The pass protocol and the one pass manager.

A pass is a small object with a ``name``, a ``level`` and ``run(graph, ctx) -> PassResult``.
Passes are functional: they return a new Graph and a list of Change records and never edit
their input. ``Pipeline`` runs passes in order, validates the graph after each one, optionally
checks numerics against the input graph, and wraps failures in PassError naming the passes
that ran before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from snapc.errors import SnapcError, UnknownNameError
from snapc.graph import Graph
from snapc.numerics import Numerics, verify

__all__ = [
    "Change",
    "PassResult",
    "PassContext",
    "Pass",
    "PassError",
    "PassRecord",
    "PipelineResult",
    "Pipeline",
    "PASSES",
    "register_pass",
    "get_pass",
    "snapc_pass",
    "Instrument",
]


@dataclass(frozen=True)
class Change:
    """One thing a pass changed: which rule fired where, and what it removed or added."""

    pass_name: str
    rule: str
    target: str
    removed: int = 0
    added: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    cost_delta: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new graph and the changes it made (empty: nothing changed)."""

    graph: Graph
    changes: tuple[Change, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        """True exactly when the pass recorded a change."""
        return bool(self.changes)


class Instrument(Protocol):
    """Hooks around each pass (timing, dumps, progress); never called from inside a pass."""

    def before_pass(self, pass_: Pass, graph: Graph) -> None: ...

    def after_pass(self, pass_: Pass, result: PassResult, seconds: float) -> None: ...


@dataclass
class PassContext:
    """Configuration shared by the passes of one pipeline run.

    ``check`` validates (and runs) the graph after each pass; ``verify_inputs`` are inputs for
    numerics against the pipeline's input graph (default: the graph's example inputs);
    ``cost`` is the cost model passes consult; ``instruments`` observe each pass.
    """

    check: bool = True
    verify: bool = False
    verify_inputs: tuple[torch.Tensor, ...] | None = None
    cost: Any = None
    device: str | None = None
    instruments: list[Instrument] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Pass(Protocol):
    """The pass protocol: a name, a level and ``run(graph, ctx) -> PassResult``."""

    name: str
    level: int

    def run(self, graph: Graph, ctx: PassContext) -> PassResult: ...


def pass_params(pass_: Pass) -> dict[str, Any]:
    """Return the configuration of a pass for the manifest (dataclass fields, else {})."""
    if is_dataclass(pass_):
        out = {}
        for f in fields(pass_):
            value = getattr(pass_, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return {k: v for k, v in out.items() if _json_ready(v)}
    return {}


def _json_ready(value: Any) -> bool:
    """Return whether ``value`` is a JSON scalar, or a list/dict of them (tensors given to a
    pass, such as Quantize's calibration ``inputs``, are not)."""
    if isinstance(value, list):
        return all(_json_ready(v) for v in value)
    if isinstance(value, dict):
        return all(_json_ready(v) for v in value.values())
    return isinstance(value, (str, int, float, bool, type(None)))


class PassError(SnapcError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, previous: Sequence[str], cause: BaseException) -> None:
        ran = ", ".join(previous) if previous else "none"
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        super().__init__(f"pass '{pass_name}' failed: {first} (after passes: {ran})")
        self.pass_name, self.previous, self.cause = pass_name, list(previous), cause


PASSES: dict[str, Callable[..., Pass]] = {}


def register_pass(factory: Callable[..., Pass]) -> Callable[..., Pass]:
    """Register a pass class or factory under its ``name``; duplicate names are rejected."""
    name = getattr(factory, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{factory!r} has no 'name' attribute to register under")
    if name in PASSES:
        raise ValueError(f"pass '{name}' is already registered")
    PASSES[name] = factory
    return factory


def get_pass(name: str) -> Callable[..., Pass]:
    """Return the registered pass factory ``name`` or raise UnknownNameError listing them."""
    try:
        return PASSES[name]
    except KeyError:
        raise UnknownNameError("pass", name, list(PASSES)) from None


PassFn = Callable[[Graph, PassContext], PassResult]


def snapc_pass(name: str, level: int = 1) -> Callable[[PassFn], Pass]:
    """Turn ``fn(graph, ctx) -> PassResult`` into a Pass object named ``name``."""

    def wrap(fn: PassFn) -> Pass:
        return _FunctionPass(name=name, level=level, fn=fn, doc=fn.__doc__ or "")

    return wrap


@dataclass(frozen=True)
class _FunctionPass:
    name: str
    level: int
    fn: PassFn
    doc: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return self.fn(graph, ctx)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did inside a pipeline run."""

    name: str
    params: dict[str, Any]
    changes: tuple[Change, ...]
    seconds: float
    numerics: Numerics | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with per-rule counts."""
        counts: dict[str, int] = {}
        for change in self.changes:
            counts[change.rule] = counts.get(change.rule, 0) + 1
        return {
            "name": self.name,
            "params": self.params,
            "seconds": round(self.seconds, 3),
            "modified": bool(self.changes),
            "rule_counts": counts,
            "changes": [c.to_json() for c in self.changes],
            "numerics_vs_input": self.numerics.to_json() if self.numerics else None,
            "info": self.info,
        }


@dataclass(frozen=True)
class PipelineResult:
    """The final graph and one record per pass run."""

    graph: Graph
    records: tuple[PassRecord, ...]

    @property
    def changes(self) -> tuple[Change, ...]:
        """Return every change of every pass, in order."""
        return tuple(c for r in self.records for c in r.changes)


class Pipeline:
    """Run passes in order; validate after each; optionally verify numerics vs the input."""

    def __init__(self, passes: Iterable[Pass], steps: int = 1) -> None:
        self.passes = list(passes)
        self.steps = steps
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"{p!r} is not a pass: it needs name, level and run()")

    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineResult:
        """Return the graph after all passes and their records.

        With ``steps > 1`` the pass list repeats until no pass changes anything. Raises PassError.
        """
        ctx = ctx or PassContext()
        original, records, ran = graph, [], []
        for _ in range(self.steps):
            changed = False
            for p in self.passes:
                for inst in ctx.instruments:
                    inst.before_pass(p, graph)
                start = time.perf_counter()
                try:
                    result = p.run(graph, ctx)
                    if not isinstance(result, PassResult):
                        raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
                    if ctx.check and result.modified:
                        result.graph.validate(run=True)
                except SnapcError as exc:
                    if isinstance(exc, PassError):
                        raise
                    raise PassError(p.name, ran, exc) from exc
                except Exception as exc:  # any failure inside a pass is reported with history
                    raise PassError(p.name, ran, exc) from exc
                seconds = time.perf_counter() - start
                numerics = None
                if ctx.verify and result.modified:
                    inputs = ctx.verify_inputs or original.example_inputs
                    numerics = verify(original, result.graph, inputs)
                records.append(PassRecord(p.name, pass_params(p), result.changes, seconds,
                                          numerics, dict(result.info)))
                for inst in ctx.instruments:
                    inst.after_pass(p, result, seconds)
                ran.append(p.name)
                changed |= result.modified
                graph = result.graph
            if not changed:
                break
        return PipelineResult(graph, tuple(records))
