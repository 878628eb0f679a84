"""Find the removable ResNet and transformer blocks of an exported graph: the block map.

A block is a module call recorded in the FX nodes' ``nn_module_stack`` metadata whose class is
ResNet-like (diffusers ``ResnetBlock2D`` or any class named like a residual block) or
transformer-like (diffusers ``Transformer2DModel``, ``BasicTransformerBlock``-style wrappers).
Only outermost matches count: a ResNet inside a transformer is part of the transformer.

For each block the map records where it sits (stage, resolution), what it costs (parameters,
MACs by op class), its FX nodes, the values that enter and leave it, and the shortcut path that
replaces it when removed. Blocks and their dataflow also form a networkx graph.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from snapc.macs import OP_CLASS_ATTENTION, node_macs

__all__ = ["Block", "BlockMap", "build_block_map", "classify_module_type", "RESNET", "TRANSFORMER"]

RESNET = "resnet"
TRANSFORMER = "transformer"

# Class names (the last dotted part of the module type) that mark a removable block.
_RESNET_TYPE = re.compile(r"(resnet|resblock|residualblock|resnetblock)", re.IGNORECASE)
_TRANSFORMER_TYPE = re.compile(
    r"(transformer2dmodel|spatialtransformer|transformerblock|attentionblock|attnblock)",
    re.IGNORECASE,
)
# diffusers' bare attention layer is a block where no transformer holds it: the self-attention
# of a VAE mid block (AutoencoderKL's decoder, snapc.vae); inside a Transformer2DModel the
# transformer is the outermost match, so UNet block maps do not change.
_ATTENTION_TYPE = re.compile(r"^Attention$")
# Containers (diffusers' CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, ...) hold blocks; they
# are not blocks themselves even when their names match the patterns above.
_CONTAINERS = re.compile(r"(Down|Up|Mid)Block|UNet|Encoder|Decoder", re.IGNORECASE)


def classify_module_type(module_type: str) -> str | None:
    """Return RESNET, TRANSFORMER or None for a module's fully-qualified class name."""
    cls = module_type.rsplit(".", 1)[-1]
    if _CONTAINERS.search(cls):
        return None
    if _TRANSFORMER_TYPE.search(cls) or _ATTENTION_TYPE.match(cls):
        return TRANSFORMER
    if _RESNET_TYPE.search(cls):
        return RESNET
    return None


@dataclass(frozen=True)
class Block:
    """One removable block: where it is, what it costs and how it is wired into the graph."""

    name: str
    kind: str
    module_type: str
    stage: str
    resolution: tuple[int, int]
    in_channels: int
    out_channels: int
    seq_len: int | None
    context_len: int | None
    context_dim: int | None
    params: int
    macs: int
    attention_macs: int
    nodes: tuple[str, ...]
    entry: tuple[str, ...]
    hidden_input: str
    exit: str
    shortcut: str | None
    removable: bool
    reason: str = ""
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shape: tuple[int, ...] = ()
    macs_by_class: Mapping[str, int] = field(default_factory=dict)
    output_scale: float = 1.0

    def signature(self, dtype: str = "float32") -> dict[str, object]:
        """Return the latency-table key of this block (kind, shapes, dtype, batch)."""
        batch = self.output_shape[0] if self.output_shape else 1
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "resolution": list(self.resolution),
            "seq_len": self.seq_len,
            "context_len": self.context_len,
            "context_dim": self.context_dim,
            "dtype": dtype,
            "batch": batch,
        }

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready summary (without the node lists)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "module_type": self.module_type,
            "stage": self.stage,
            "resolution": list(self.resolution),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "seq_len": self.seq_len,
            "context_len": self.context_len,
            "context_dim": self.context_dim,
            "params": self.params,
            "macs": self.macs,
            "attention_macs": self.attention_macs,
            "macs_by_class": dict(self.macs_by_class),
            "n_nodes": len(self.nodes),
            "entry": list(self.entry),
            "exit": self.exit,
            "shortcut": self.shortcut,
            "removable": self.removable,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class BlockMap:
    """All blocks of a graph, the modules left uncovered, and the block dataflow graph."""

    blocks: dict[str, Block]
    dataflow: nx.DiGraph
    uncovered: tuple[str, ...]
    removed: tuple[str, ...]

    def __getitem__(self, name: str) -> Block:
        return self.blocks[name]

    def __contains__(self, name: object) -> bool:
        return name in self.blocks

    def __iter__(self):
        return iter(self.blocks.values())

    def __len__(self) -> int:
        return len(self.blocks)

    def of_kind(self, kind: str) -> list[Block]:
        """Return the blocks of one kind (RESNET or TRANSFORMER) in graph order."""
        return [b for b in self.blocks.values() if b.kind == kind]

    def counts(self) -> dict[str, int]:
        """Return the number of blocks per kind."""
        return dict(Counter(b.kind for b in self.blocks.values()))


def _module_path(path: str, root: str) -> str:
    if root and path.startswith(root + "."):
        return path[len(root) + 1 :]
    return "" if path == root else path


def _stage_of(name: str) -> str:
    match = re.match(r"(down|up)_blocks\.(\d+)", name)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    if name.startswith("mid_block"):
        return "mid"
    return name.split(".", 1)[0]


def _val_shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()


def _find_block_calls(graph: fx.Graph, root: str) -> dict[str, tuple[str, list[fx.Node]]]:
    """Return {block name: (module type, nodes)} for outermost block module calls, in order."""
    found: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        for path, module_type in stack.values():
            if not isinstance(module_type, str):
                module_type = f"{module_type.__module__}.{module_type.__qualname__}"
            name = _module_path(path, root)
            if name and classify_module_type(module_type):
                found.setdefault(name, (module_type, []))[1].append(node)
                break
    return found


def _param_counts(
    param_of_placeholder: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], root: str
) -> dict[str, int]:
    """Return {parameter fqn relative to root: numel}."""
    out: dict[str, int] = {}
    for fqn in param_of_placeholder.values():
        shape = shapes.get(fqn, ())
        numel = 1
        for d in shape:
            numel *= d
        out[_module_path(fqn, root)] = numel
    return out


def build_block_map(
    program: torch.export.ExportedProgram,
    root: str = "",
    removed: Iterable[str] = (),
    output_scales: Mapping[str, float] | None = None,
) -> BlockMap:
    """Return the block map of an exported program.

    ``root`` is the attribute path of the traced model inside the exported wrapper; it is
    stripped from block names. Blocks named in ``removed`` (already replaced by their shortcut)
    are left out even though their shortcut nodes still carry their module path.
    """
    removed = tuple(removed)
    graph = program.graph
    sig = program.graph_signature
    param_of = dict(sig.inputs_to_parameters)
    param_of.update(sig.inputs_to_buffers)
    shapes = {k: tuple(v.shape) for k, v in program.state_dict.items()}
    shapes.update({k: tuple(v.shape) for k, v in program.constants.items()
                   if isinstance(v, torch.Tensor)})
    param_numel = _param_counts(param_of, shapes, root)
    constant_inputs = set(param_of) | set(sig.inputs_to_lifted_tensor_constants)

    calls = _find_block_calls(graph, root)
    blocks: dict[str, Block] = {}
    node_owner: dict[fx.Node, str] = {}
    for name, (module_type, nodes) in calls.items():
        if any(name == r or name.startswith(r + ".") for r in removed):
            continue
        block = _describe_block(name, module_type, nodes, constant_inputs, param_numel,
                                (output_scales or {}).get(name, 1.0))
        blocks[name] = block
        node_owner.update({n: name for n in nodes})

    covered = set()
    for name in blocks:
        covered.update(p for p in param_numel if p.startswith(name + "."))
    for name in removed:
        covered.update(p for p in param_numel if p.startswith(name + "."))
    uncovered_modules = sorted({p.rsplit(".", 1)[0] for p in param_numel if p not in covered})
    return BlockMap(
        blocks=blocks,
        dataflow=_dataflow(graph, blocks, node_owner, tuple(sig.user_inputs[:1])),
        uncovered=_collapse(uncovered_modules),
        removed=removed,
    )


def _collapse(modules: list[str]) -> tuple[str, ...]:
    """Collapse module paths to short parents (conv_in, down_blocks.0.downsamplers)."""
    out: list[str] = []
    for module in modules:
        parts = module.split(".")
        keep = 3 if len(parts) > 2 and parts[1].isdigit() else 1
        short = ".".join(parts[:keep])
        if short not in out:
            out.append(short)
    return tuple(out)


def _describe_block(
    name: str,
    module_type: str,
    nodes: list[fx.Node],
    constant_inputs: set[str],
    param_numel: Mapping[str, int],
    output_scale: float,
) -> Block:
    kind = classify_module_type(module_type) or RESNET
    members = set(nodes)
    entry: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg.name not in constant_inputs and arg not in entry:
                entry.append(arg)
    exits = [n for n in nodes if any(u not in members for u in n.users)]
    activations = [e for e in entry if len(_val_shape(e)) >= 3]
    hidden = activations[0] if activations else (entry[0] if entry else nodes[0])
    context = next((e for e in activations if len(_val_shape(e)) == 3), None)
    hidden_shape = _val_shape(hidden)
    exit_node = exits[-1] if exits else nodes[-1]
    out_shape = _val_shape(exit_node)

    shortcut = None
    if kind == RESNET:
        shortcut_nodes = [n for n in nodes if any(
            _is_shortcut_path(path, name) for path, _ in n.meta["nn_module_stack"].values())]
        shortcut = shortcut_nodes[-1].name if shortcut_nodes else None
    shortcut_shape = (
        _val_shape(next(n for n in nodes if n.name == shortcut)) if shortcut else hidden_shape
    )
    removable, reason = True, ""
    if len(exits) != 1:
        removable, reason = False, f"{len(exits)} values leave the block (need exactly one)"
    elif shortcut_shape != out_shape:
        removable = False
        reason = f"shortcut shape {list(shortcut_shape)} != output shape {list(out_shape)}"

    macs: Counter[str] = Counter()
    for node in nodes:
        counted = node_macs(node)
        if counted:
            macs[counted.op_class] += counted.macs
    height, width = (hidden_shape[-2], hidden_shape[-1]) if len(hidden_shape) == 4 else (0, 0)
    if len(hidden_shape) == 3:  # (B, L, C) sequence input
        height, width = hidden_shape[1], 1
    channels_in = hidden_shape[1] if len(hidden_shape) == 4 else hidden_shape[-1]
    channels_out = out_shape[1] if len(out_shape) == 4 else (out_shape[-1] if out_shape else 0)
    ctx_shape = _val_shape(context) if context is not None else None
    return Block(
        name=name,
        kind=kind,
        module_type=module_type,
        stage=_stage_of(name),
        resolution=(height, width),
        in_channels=channels_in,
        out_channels=channels_out,
        seq_len=height * width if kind == TRANSFORMER else None,
        context_len=ctx_shape[1] if ctx_shape else None,
        context_dim=ctx_shape[2] if ctx_shape else None,
        params=sum(v for k, v in param_numel.items() if k.startswith(name + ".")),
        macs=sum(macs.values()),
        attention_macs=macs[OP_CLASS_ATTENTION],
        nodes=tuple(n.name for n in nodes),
        entry=tuple(e.name for e in entry),
        hidden_input=hidden.name,
        exit=exit_node.name,
        shortcut=shortcut,
        removable=removable,
        reason=reason,
        input_shapes=tuple(_val_shape(e) for e in entry),
        output_shape=out_shape,
        macs_by_class=dict(macs),
        output_scale=output_scale,
    )


def _is_shortcut_path(path: str, block: str) -> bool:
    tail = path.rsplit(".", 1)[-1]
    return path.endswith(block + "." + tail) and tail in ("conv_shortcut", "shortcut", "skip")


def _dataflow(
    graph: fx.Graph, blocks: Mapping[str, Block], owner: Mapping[fx.Node, str],
    sources: tuple[str, ...],
) -> nx.DiGraph:
    """Return a DiGraph of blocks plus 'input'/'output': A->B when A's exit reaches B directly."""
    dag = nx.DiGraph()
    dag.add_node("input")
    for block in blocks.values():
        dag.add_node(block.name, kind=block.kind, stage=block.stage, macs=block.macs)
    dag.add_node("output")
    by_name = {n.name: n for n in graph.nodes}

    def walk(start: fx.Node, source: str) -> None:
        seen: set[fx.Node] = set()
        frontier = list(start.users)
        while frontier:
            node = frontier.pop()
            if node in seen:
                continue
            seen.add(node)
            target = owner.get(node)
            if target and target != source:
                dag.add_edge(source, target)
            elif node.op == "output":
                dag.add_edge(source, "output")
            elif not target:
                frontier.extend(node.users)

    for block in blocks.values():
        walk(by_name[block.exit], block.name)
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in sources:
            walk(node, "input")
    return dag
