"""A small pattern matcher and the one rewrite driver for FX graphs.

Rewrites are data: a ``Rule`` is a pattern, a replacement and an optional check. Patterns are
trees of ``Op`` (a call to one of some ATen targets, arguments matched by schema name after
normalisation, so positional/keyword spelling and defaults do not matter), ``Var`` (anything,
captured by name; a second use of the name must be the same value), ``Lit`` (a non-node value
passing a predicate) and ``Alt`` (the first alternative that matches). ``rewrite()`` owns the
traversal, the single-use check of interior nodes, the fixed point and the loop guard; a rule's
replacement only builds new nodes and returns the node that replaces the pattern's root (or
``None``: not applicable).

torch.fx's ``subgraph_rewriter`` was not used: it matches traced Python functions literally, so
every keyword/positional spelling, default argument and commuted operand needs its own pattern,
and it cannot express "the same tensor feeds three projections".
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

__all__ = ["Pat", "Op", "Var", "Val", "Lit", "Alt", "Item", "Match", "Rule", "RuleSet", "Hit",
           "rewrite", "maybe", "node_kwargs", "module_path", "META_KEYS"]

aten = torch.ops.aten
# Nodes that only check a tensor and are not real users of it (torch.export inserts them).
_CHECK_TARGETS = (aten._assert_tensor_metadata.default,)
# Node metadata copied onto replacement nodes so block maps and stack traces stay readable.
META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")
REWRITE_LIMIT = 10_000


def node_kwargs(node: fx.Node) -> dict[str, Any] | None:
    """Return the node's arguments as {schema name: value} with defaults filled in, or None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    pair = normalize_function(node.target, node.args, node.kwargs,
                              normalize_to_only_use_kwargs=True)
    return None if pair is None else dict(pair.kwargs)


@dataclass
class Match:
    """Captures of one successful match: named values plus the interior nodes matched."""

    values: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        """Return the capture ``name`` or ``default``."""
        return self.values.get(name, default)

    def copy(self) -> Match:
        """Return an independent copy (for trying alternatives)."""
        return Match(dict(self.values), list(self.nodes))

    def bind(self, name: str | None, value: Any) -> bool:
        """Capture ``value`` as ``name``; False when ``name`` already holds another value."""
        if name is None:
            return True
        if name in self.values:
            return self.values[name] is value or (
                not isinstance(value, fx.Node) and self.values[name] == value)
        self.values[name] = value
        return True


class Pat:
    """A pattern: ``match(value, m)`` extends ``m`` and returns True, or returns False."""

    def match(self, value: Any, m: Match) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pat):
    """Any value (node or literal), captured as ``name``."""

    name: str | None = None

    def match(self, value: Any, m: Match) -> bool:
        return m.bind(self.name, value)


@dataclass(frozen=True)
class Val(Pat):
    """A tensor-valued node (not a literal), captured as ``name``."""

    name: str | None = None

    def match(self, value: Any, m: Match) -> bool:
        return isinstance(value, fx.Node) and m.bind(self.name, value)


@dataclass(frozen=True)
class Item(Pat):
    """``source[index]`` (an ``operator.getitem`` node on a multi-output op), interior."""

    source: Pat
    index: int

    def match(self, value: Any, m: Match) -> bool:
        if not (isinstance(value, fx.Node) and value.target is operator.getitem
                and len(value.args) == 2 and value.args[1] == self.index):
            return False
        trial = m.copy()
        if not self.source.match(value.args[0], trial):
            return False
        trial.nodes.append(value)
        m.values, m.nodes = trial.values, trial.nodes
        return True


@dataclass(frozen=True)
class Lit(Pat):
    """A non-node value for which ``test`` holds, captured as ``name``."""

    test: Callable[[Any], bool] = lambda _: True
    name: str | None = None

    def match(self, value: Any, m: Match) -> bool:
        if isinstance(value, fx.Node):
            return False
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError):
            ok = False
        return ok and m.bind(self.name, value)


@dataclass(frozen=True)
class Alt(Pat):
    """The first of ``options`` that matches."""

    options: tuple[Pat, ...]

    def match(self, value: Any, m: Match) -> bool:
        for option in self.options:
            trial = m.copy()
            if option.match(value, trial):
                m.values, m.nodes = trial.values, trial.nodes
                return True
        return False


class Op(Pat):
    """A call to one of ``targets`` whose named arguments match ``fields``.

    ``commute`` also tries ``input``/``other`` swapped (add, mul). Field names are the
    schema names after torch.fx normalisation (which spells ``self`` as ``input``). The node
    is captured as ``name`` and counted as interior to the match (no users outside it).
    """

    def __init__(self, targets: Any, /, name: str | None = None, commute: bool = False,
                 **fields: Pat) -> None:  # positional-only self: ``input=``/``self=`` are fields
        self.targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
        self.name, self.commute, self.fields = name, commute, fields

    def __repr__(self) -> str:
        return f"Op({', '.join(str(t) for t in self.targets)})"

    def match(self, value: Any, m: Match) -> bool:
        if not isinstance(value, fx.Node) or value.target not in self.targets:
            return False
        kwargs = node_kwargs(value)
        if kwargs is None:
            return False
        for variant in self._variants(kwargs):
            trial = m.copy()
            if all(key in variant and pat.match(variant[key], trial)
                   for key, pat in self.fields.items()) and trial.bind(self.name, value):
                trial.nodes.append(value)
                m.values, m.nodes = trial.values, trial.nodes
                return True
        return False

    def _variants(self, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield kwargs
        if self.commute and "input" in kwargs and "other" in kwargs:
            yield {**kwargs, "input": kwargs["other"], "other": kwargs["input"]}


def maybe(targets: Any, inner: Pat) -> Pat:
    """Match ``inner`` optionally wrapped in one call of ``targets`` on its ``self`` argument."""
    return Alt((Op(targets, input=inner), inner))


Replacement = Callable[[fx.Graph, Match, fx.Node], fx.Node | None]
Check = Callable[[Match], str | None]


@dataclass(frozen=True)
class Rule:
    """A named rewrite: ``pattern`` rooted at the node it replaces, ``replace(graph, match,
    root)`` building the new nodes (inserted before the root), and ``check(match)`` returning
    a failure reason or None."""

    name: str
    pattern: Pat
    replace: Replacement
    check: Check | None = None


class RuleSet(tuple):
    """An ordered tuple of rules; ``a + b`` concatenates rule sets."""

    def __new__(cls, rules: Iterable[Rule] = ()) -> RuleSet:
        return super().__new__(cls, tuple(rules))

    def __add__(self, other: Iterable[Rule]) -> RuleSet:  # type: ignore[override]
        return RuleSet(tuple(self) + tuple(other))


@dataclass(frozen=True)
class Hit:
    """One applied rewrite: the rule, the module path (or node name) of the root, new node."""

    rule: str
    target: str
    removed: int
    node: str
    detail: dict[str, Any] = field(default_factory=dict)


def module_path(node: fx.Node) -> str:
    """Return the innermost module path recorded for ``node`` (else its name)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("net.")


def _real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in _CHECK_TARGETS]


def _interior_escapes(match: Match, root: fx.Node) -> bool:
    inside = set(match.nodes)
    for node in inside:
        if node is root:
            continue
        if any(u not in inside for u in _real_users(node)):
            return True
    return False


def _apply(graph: fx.Graph, rule: Rule, match: Match, root: fx.Node) -> fx.Node | None:
    with graph.inserting_before(root):
        new = rule.replace(graph, match, root)
    if new is None:
        return None
    for key in META_KEYS:
        if key in root.meta and key not in new.meta:
            new.meta[key] = root.meta[key]
    root.replace_all_uses_with(new)
    for node in reversed(list(dict.fromkeys(match.nodes))):
        if getattr(node, "_erased", False):
            continue
        for user in list(node.users):
            if user.target in _CHECK_TARGETS:
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
    return new


def rewrite(gm: fx.GraphModule, rules: Iterable[Rule], limit: int = REWRITE_LIMIT) -> list[Hit]:
    """Apply ``rules`` to ``gm`` in place until none matches; return one Hit per rewrite.

    Nodes are visited in graph order and the first rule that matches, passes its check and
    returns a replacement wins. Interior nodes of a match must have no users outside it.
    Raises RuntimeError past ``limit`` rewrites (a rule that keeps matching its own output).
    """
    rules = tuple(rules)
    graph, hits = gm.graph, []
    changed = True
    while changed:
        changed = False
        for root in list(graph.nodes):
            if getattr(root, "_erased", False) or root.op != "call_function":
                continue
            for rule in rules:
                match = Match()
                if not rule.pattern.match(root, match) or _interior_escapes(match, root):
                    continue
                if rule.check is not None and rule.check(match) is not None:
                    continue
                target, count = module_path(root), len(set(match.nodes))
                new = _apply(graph, rule, match, root)
                if new is None:
                    continue
                hits.append(Hit(rule.name, target, count, new.name))
                if len(hits) > limit:
                    raise RuntimeError(f"rewrite loop: more than {limit} rewrites; "
                                       f"rule '{rule.name}' keeps matching its own output")
                changed = True
                break
    graph.lint()
    gm.recompile()
    return hits
