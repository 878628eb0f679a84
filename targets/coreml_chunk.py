"""Split a Core ML mlprogram into N chained mlpackages, each under a weight budget.

iOS refuses to load an unpalettized SD UNet in one piece (Apple's ml-stable-diffusion splits it
with ``--chunk-unet``). A split here is a list of cut points in the op order of the program's
``main`` function, placed near equal shares of the weight bytes, at the point with the fewest
live activations in a short window. Chunk k keeps the ops between two cuts: every value made
earlier and read inside becomes a function input of the same name and dtype, every value made
inside and read later (or returned) becomes an output. A runner keeps one dict of named values
(the model inputs plus each chunk's outputs) and feeds every chunk from it in order; the chain
is recorded in the manifest.

Built on coremltools' MIL program API (placeholders, ``replace_uses_of_var_after_op``, dead code
elimination), the same pieces ``coremltools.models.utils.bisect_model`` uses; bisect_model itself
is not used because it cuts only in two and casts every boundary to fp32.

Requires: an mlprogram with one ``main`` function and static shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapc.errors import SnapcError

__all__ = ["ChunkSpec", "plan_cuts", "weight_bytes", "make_chunk_program", "chunk_model",
           "CUT_WINDOW"]

# How many ops past a weight-balanced point the cut may move to find fewer live activations.
CUT_WINDOW = 64


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of a chain: its op range (start, end], inputs, outputs and weight bytes."""

    index: int
    start: int
    end: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"index": self.index, "ops": [self.start + 1, self.end],
                "inputs": list(self.inputs), "outputs": list(self.outputs),
                "weight_bytes": self.weight_bytes}


def _const_bytes(op: Any) -> int:
    if op.op_type != "const":
        return 0
    val = op.outputs[0].val
    return int(val.nbytes) if isinstance(val, np.ndarray) else 0


def weight_bytes(program: Any) -> int:
    """Return the bytes of all constant tensors (weights, palettes, indices) of ``main``."""
    return sum(_const_bytes(op) for op in program.functions["main"].operations)


def _var_uses(var: Any) -> list[Any]:
    return list(var.child_ops)


def _live_counts(ops: list[Any], index: dict[int, int], final: set[str]) -> np.ndarray:
    """Return, for a cut after op i, how many non-const values cross it."""
    delta = np.zeros(len(ops) + 1, dtype=np.int64)
    for i, op in enumerate(ops):
        if op.op_type.startswith("const"):
            continue
        for var in op.outputs:
            last = max((index[id(c)] for c in _var_uses(var)), default=i)
            if var.name in final:
                last = len(ops)
            if last > i:
                delta[i] += 1
                delta[last] -= 1
    return np.cumsum(delta)


def _bytes_at_first_use(ops: list[Any], index: dict[int, int]) -> list[int]:
    """Return weight bytes per op position, each constant counted at its first consumer
    (constants can sit far from where they are used in the op order)."""
    at = [0] * len(ops)
    for i, op in enumerate(ops):
        size = _const_bytes(op)
        if size:
            users = [index[id(c)] for c in _var_uses(op.outputs[0])]
            at[min(users, default=i)] += size
    return at


def plan_cuts(program: Any, chunks: int) -> list[int]:
    """Return ``chunks - 1`` op indices to cut ``main`` after, splitting weights evenly.

    Each cut is the op, within CUT_WINDOW non-const ops after the weight-balanced point (or
    before it, near the end of the program), that leaves the fewest live values crossing it.
    Raises SnapcError when the program has too few ops for the request.
    """
    block = program.functions["main"]
    ops = list(block.operations)
    index = {id(op): i for i, op in enumerate(ops)}
    final = {v.name for v in block.outputs}
    live = _live_counts(ops, index, final)
    cumulative = np.cumsum(_bytes_at_first_use(ops, index))
    total = int(cumulative[-1]) if len(ops) else 0
    cuts: list[int] = []
    for k in range(1, chunks):
        start = int(np.searchsorted(cumulative, total * k / chunks))
        allowed = [i for i in range(cuts[-1] + 1 if cuts else 0, len(ops) - 1)
                   if not ops[i].op_type.startswith("const")]
        allowed = allowed[:len(allowed) - (chunks - k - 1)]  # room for the cuts still to come
        later = [i for i in allowed if i >= start]
        # the window after the balanced point; near the end, the ops just before it
        candidates = later[:CUT_WINDOW] or allowed[-CUT_WINDOW:]
        if not candidates:
            raise SnapcError(f"cannot cut the program into {chunks} chunks; ask for fewer chunks")
        cuts.append(min(candidates, key=lambda i: (int(live[i]), abs(i - start))))
    return cuts


def _chunk_io(ops: list[Any], start: int, end: int, block: Any) -> tuple[list[Any], list[Any]]:
    """Return (entering vars, leaving vars) of the ops in (start, end]."""
    index = {id(op): i for i, op in enumerate(ops)}
    final = {v.name for v in block.outputs}
    entering: dict[str, Any] = {}
    for op in ops[start + 1:end + 1]:
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                producer = var.op
                if producer is None:  # a function input
                    entering[var.name] = var
                elif index[id(producer)] <= start and not producer.op_type.startswith("const"):
                    entering[var.name] = var
    leaving: dict[str, Any] = {}
    for op in ops[start + 1:end + 1]:
        if op.op_type.startswith("const"):
            continue
        for var in op.outputs:
            later = any(index[id(c)] > end for c in _var_uses(var))
            if later or var.name in final:
                leaving[var.name] = var
    return list(entering.values()), list(leaving.values())


def make_chunk_program(program: Any, start: int, end: int) -> tuple[Any, list[str], list[str]]:
    """Turn ``program`` (edited in place; pass a fresh copy) into the chunk of ops (start, end].

    Returns (program, input names, output names).
    """
    from coremltools.converters.mil.mil import Placeholder
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    block = program.functions["main"]
    ops = list(block.operations)
    entering, leaving = _chunk_io(ops, start, end, block)
    anchor = ops[start] if start >= 0 else None
    with block:
        for var in entering:
            if var.op is None:
                continue  # model inputs stay function inputs
            holder = Placeholder(sym_shape=var.shape, dtype=var.dtype, name=var.name)
            new_var = holder.outputs[0]
            block._input_dict[var.name] = new_var
            block.function_inputs = tuple(block._input_dict.values())
            block.replace_uses_of_var_after_op(anchor_op=anchor, old_var=var, new_var=new_var,
                                               force_replace=True)
        block.outputs.clear()
        block.set_outputs(leaving)
    PASS_REGISTRY["common::dead_code_elimination"](program)
    used = {k: v for k, v in block._input_dict.items() if v.child_ops or v in block.outputs}
    block._input_dict = used
    block.function_inputs = tuple(used.values())
    return program, list(used), [v.name for v in block.outputs]


def chunk_model(
    load_program: Callable[[], Any],
    chunks: int,
    convert: Callable[[Any], Any],
) -> list[tuple[Any, ChunkSpec]]:
    """Split the program ``load_program()`` returns into ``chunks`` models.

    ``load_program`` must return a fresh Program on each call (each chunk edits its own copy);
    ``convert`` turns a chunk Program into an MLModel. Returns (MLModel, ChunkSpec) per chunk.
    """
    if chunks < 2:
        raise SnapcError(f"chunking needs at least 2 chunks, got {chunks}; pass --chunks 2 or more")
    program = load_program()
    cuts = plan_cuts(program, chunks)
    n_ops = len(program.functions["main"].operations)
    del program
    bounds = [-1, *cuts, n_ops - 1]
    out = []
    for k in range(chunks):
        piece, inputs, outputs = make_chunk_program(load_program(), bounds[k], bounds[k + 1])
        spec = ChunkSpec(index=k + 1, start=bounds[k], end=bounds[k + 1], inputs=tuple(inputs),
                         outputs=tuple(outputs), weight_bytes=weight_bytes(piece))
        out.append((convert(piece), spec))
        del piece
    return out


def chunks_needed(total_bytes: int, max_bytes: int) -> int:
    """Return the fewest chunks that could keep every chunk under ``max_bytes`` (at least 1)."""
    return max(1, math.ceil(total_bytes / max_bytes))
