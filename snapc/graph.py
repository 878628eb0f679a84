"""The Graph: a torch.export program of a UNet plus its block map.

A Graph is a value: passes never edit one in place, they build a new one with
:meth:`Graph.with_program`. It offers running, validating and block queries, and nothing that
belongs to a pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from snapc.blocks import BlockMap, build_block_map
from snapc.macs import node_macs

__all__ = ["Graph", "ModelInfo", "GraphInvalidError", "drop_unused_attributes",
           "eliminate_dead_code"]

# FX's dead-code elimination keeps every node it calls impure and all that node reads. Random
# ops count as impure (dropout, and SDPA for its dropout_p) though they are identities or pure
# in an eval graph, and so do export's metadata assertions: a bypassed block would still run.
# Here a node is kept when it writes to memory (a mutable schema) or is a module call (export's
# input guards); an assertion is kept while the tensor it checks is live.
_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


def _side_effect(node: torch.fx.Node) -> bool:
    if node.op in ("placeholder", "output", "call_module", "call_method"):
        return True
    if node.op != "call_function":
        return False
    if node.target in _ASSERTS:
        checked = node.args[0] if node.args else None
        return not isinstance(checked, torch.fx.Node) or any(
            user.target not in _ASSERTS for user in checked.users)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    return node.is_impure()


def eliminate_dead_code(gm: torch.fx.GraphModule) -> int:
    """Drop the nodes of ``gm`` whose values no output needs (random ops in eval graphs and
    assertions on dead tensors included; see ``_side_effect``). Edits ``gm`` in place;
    returns the number of nodes removed."""
    before = len(gm.graph.nodes)
    while gm.graph.eliminate_dead_code(is_impure_node=_side_effect):
        pass
    gm.recompile()
    return before - len(gm.graph.nodes)


def drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers of ``gm`` that no get_attr node reads any more (an
    edited graph re-exports with only the weights it uses). Edits ``gm`` in place."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, attr)


class GraphInvalidError(RuntimeError):
    """A graph failed validation (lint, shape or run check)."""


@dataclass(frozen=True)
class ModelInfo:
    """Where a graph came from: model name, weights, config, and whether weights are random."""

    name: str
    random_weights: bool
    config: dict | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    base: str | None = None  # the model a pruned / distilled one was derived from
    removed: tuple[str, ...] = ()  # blocks its folder says were removed
    sampler: dict | None = None  # the sampling recipe stored with the weights

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready dict."""
        out: dict[str, object] = {
            "name": self.name,
            "random_weights": self.random_weights,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "config": self.config,
        }
        if self.base is not None:
            out |= {"base": self.base, "removed_blocks": list(self.removed)}
        if self.sampler is not None:
            out["sampler"] = self.sampler
        return out


@dataclass(frozen=True)
class Graph:
    """An exported UNet (or any module) graph with its block map.

    ``program`` takes ``input_names`` positionally and returns one tensor. ``root`` is the
    attribute path of the user's model inside the traced wrapper (stripped from block names).
    ``removed`` lists blocks already replaced by their shortcut.
    """

    program: torch.export.ExportedProgram
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    source: ModelInfo
    root: str = "net"
    removed: tuple[str, ...] = ()
    output_scales: dict[str, float] = field(default_factory=dict)
    retrace: Callable[[tuple[torch.Tensor, ...]], torch.export.ExportedProgram] | None = field(
        default=None, compare=False, repr=False)
    # Per-layer quantization records (snapc.passes.quantize): {weight name: {"scheme": ...}}.
    quant: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def blocks(self) -> BlockMap:
        """Return the block map (computed once per graph)."""
        return build_block_map(self.program, self.root, self.removed, self.output_scales)

    @property
    def fx(self) -> torch.fx.Graph:
        """Return the FX graph of the program (read it; do not edit it)."""
        return self.program.graph

    def module(self) -> nn.Module:
        """Return a runnable module taking ``input_names`` and returning the output tensor."""
        return self.program.module()

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the graph on ``inputs`` (default: the example inputs) and return its output."""
        with torch.no_grad():
            return self.module()(*(inputs or self.example_inputs))

    @cached_property
    def example_output(self) -> torch.Tensor:
        """Return the output on the example inputs, computed once per graph (a Graph is never
        edited: passes return new ones), so checks and verifications of one pass and the next
        share one forward run."""
        out = self.run()
        return out[0] if isinstance(out, (tuple, list)) else out

    def with_program(
        self, program: torch.export.ExportedProgram, removed: tuple[str, ...] | None = None
    ) -> Graph:
        """Return a new Graph around ``program``, keeping this graph's inputs and source."""
        return replace(self, program=program,
                       removed=self.removed if removed is None else removed)

    def edited(self) -> torch.fx.GraphModule:
        """Return a fresh, editable GraphModule of this program (params as attributes).

        Editing it never touches this Graph; hand it back with :meth:`reexport`.
        """
        return self.program.module()

    def reexport(self, gm: torch.fx.GraphModule, removed: tuple[str, ...] | None = None) -> Graph:
        """Return a new Graph made by exporting the edited ``gm`` on the example inputs."""
        gm.graph.lint()
        gm.recompile()
        with torch.no_grad():
            program = torch.export.export(gm, self.example_inputs, strict=False)
        return self.with_program(program, removed)

    def with_inputs(self, inputs: tuple[torch.Tensor, ...]) -> Graph:
        """Return a copy of this graph that uses ``inputs`` as its example inputs."""
        return replace(self, example_inputs=tuple(inputs))

    def at_batch(self, inputs: tuple[torch.Tensor, ...]) -> Graph:
        """Return this graph traced again for ``inputs`` (e.g. another batch size), with the
        same blocks removed. Exported shapes are static, so this re-traces the source module;
        passes other than block removal applied since tracing are not carried over.
        """
        def key(tensors: tuple[torch.Tensor, ...]) -> tuple:
            return tuple((tuple(t.shape), t.device) for t in tensors)

        if key(tuple(inputs)) == key(self.example_inputs):
            return self
        if self.retrace is None:
            raise GraphInvalidError("graph has no source module to trace at another batch "
                                    "size; trace it with snapc.trace")
        fresh = replace(self, program=self.retrace(tuple(inputs)), example_inputs=tuple(inputs),
                        removed=())
        if not self.removed:
            return fresh
        from snapc.passes.remove_blocks import remove_blocks

        return remove_blocks(fresh, self.removed)[0]

    def param_count(self) -> int:
        """Return the number of parameter elements the program uses."""
        return sum(int(t.numel()) for t in self.program.state_dict.values())

    def param_bytes(self) -> int:
        """Return the bytes of the program's parameters and buffers."""
        return sum(int(t.numel() * t.element_size()) for t in self.program.state_dict.values())

    def macs_by_class(self) -> dict[str, int]:
        """Return total MACs per op class (conv, linear, attention) for one evaluation."""
        totals: dict[str, int] = {}
        for node in self.fx.nodes:
            counted = node_macs(node)
            if counted:
                totals[counted.op_class] = totals.get(counted.op_class, 0) + counted.macs
        return totals

    def output_shape(self) -> tuple[int, ...]:
        """Return the static shape of the (single) output."""
        out = next(n for n in self.fx.nodes if n.op == "output")
        value = out.args[0]
        value = value[0] if isinstance(value, (tuple, list)) else value
        return tuple(int(d) for d in value.meta["val"].shape)

    def validate(self, run: bool = True) -> None:
        """Check the graph: FX lint, one output, and (with ``run``) that it executes on the
        example inputs with the recorded output shape. Raises GraphInvalidError."""
        try:
            self.program.graph.lint()
        except Exception as exc:  # lint raises plain RuntimeError/AssertionError
            raise GraphInvalidError(f"FX lint failed: {exc}") from exc
        expected = self.output_shape()
        if not run or any(t.device.type == "meta" for t in self.example_inputs):
            return
        out = self.example_output
        if tuple(out.shape) != expected:
            raise GraphInvalidError(f"output shape {tuple(out.shape)} != recorded {expected}")
        if not torch.isfinite(out).all():
            raise GraphInvalidError("output has NaN or Inf on the example inputs")
