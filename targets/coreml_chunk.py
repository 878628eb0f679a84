"""Split a Core ML mlpackage into N chained mlpackages, each under a weight budget.

iOS refuses to load an unpalettized SD UNet in one piece (Apple's ml-stable-diffusion splits it
with ``--chunk-unet``). A split here is a list of cut points in the op order of the program's
``main`` function, placed within CUT_TOLERANCE of equal shares of the weight bytes, at the point
with the fewest live activations. Chunk k keeps the ops between two cuts that its outputs need:
every value made earlier and read inside becomes a function input of the same name and type,
every value made inside and read later (or returned) becomes an output, and the weights it reads
come along. A runner keeps one dict of named values (the model inputs plus each chunk's outputs)
and feeds every chunk from it in order; the chain is recorded in the manifest.

The split works on the package as stored: the protobuf program (``model.mlmodel``) is copied
with the chunk's ops, inputs and outputs, and the weights it reads are copied blob by blob from
``weight.bin`` with coremltools' own blob reader and writer. Nothing is re-converted or loaded as
a MIL ``Program`` (that took ~5 s per copy of SD-1.5 and one copy per chunk). The chunks'
outputs are checked against the whole program by the caller (targets/coreml.py runs both with
the MIL interpreter). ``coremltools.models.utils.bisect_model`` is not used because it cuts only
in two and casts every boundary to fp32.

Requires: an mlprogram with one ``main`` function, no control flow, static shapes.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapc.errors import SnapcError

__all__ = ["ChunkSpec", "plan_cuts", "weight_bytes", "split_package", "read_ops", "chunks_needed",
           "CUT_TOLERANCE"]

# How far (share of all weight bytes) a cut may sit from its weight-balanced point to find a
# place with fewer live activations.
CUT_TOLERANCE = 0.04


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
    """Return the bytes of all constant tensors (weights, palettes, indices) of a MIL Program's
    ``main``."""
    return sum(_const_bytes(op) for op in program.functions["main"].operations)


# ---- the program as stored ----------------------------------------------------------------------

_BITS = {"FLOAT16": 16, "FLOAT32": 32, "FLOAT64": 64, "BFLOAT16": 16, "INT8": 8, "INT16": 16,
         "INT32": 32, "INT64": 64, "UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64,
         "BOOL": 8, "INT4": 4, "UINT4": 4, "UINT2": 2, "UINT1": 1, "UINT6": 6, "UINT3": 3}
# blob reader/writer method per stored dtype (coremltools.libmilstoragepython)
_BLOB_IO = {"FLOAT16": "fp16", "FLOAT32": "float", "INT8": "int8", "INT16": "int16",
            "INT32": "int32", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
            "INT4": "int4", "UINT4": "uint4", "UINT2": "uint2", "UINT1": "uint1", "UINT6": "uint6",
            "UINT3": "uint3"}


@dataclass(frozen=True)
class _Op:
    """An op of the stored program: what it reads and writes, and the weight bytes it holds."""

    kind: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    nbytes: int

    @property
    def weight(self) -> bool:
        """Whether the op only holds data (``const``, ``constexpr_*``): it stays with its
        readers, never a chunk boundary."""
        return self.kind.startswith("const")


def _dtype_name(tensor_type: Any) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(tensor_type.dataType)


def _value_bytes(value: Any) -> int:
    """Bytes of a tensor Value (an op attribute) as stored."""
    if value.type.WhichOneof("type") != "tensorType":
        return 0
    tensor = value.type.tensorType
    count = math.prod(d.constant.size for d in tensor.dimensions)
    return math.ceil(count * _BITS.get(_dtype_name(tensor), 0) / 8)


def _main_block(spec: Any) -> Any:
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset]


def read_ops(spec: Any) -> list[_Op]:
    """Return the ops of ``main`` of a model spec (``ct.utils.load_spec``), in program order.

    Raises SnapcError for control flow (an op with nested blocks), which the split cannot keep.
    """
    ops = []
    for op in _main_block(spec).operations:
        if len(op.blocks):
            raise SnapcError(f"cannot chunk a program with control flow (op '{op.type}'); "
                             "use --chunks 1")
        reads = tuple(binding.name for argument in op.inputs.values()
                      for binding in argument.arguments if binding.WhichOneof("binding") == "name")
        nbytes = sum(_value_bytes(v) for k, v in op.attributes.items() if k != "name")
        ops.append(_Op(op.type, reads, tuple(o.name for o in op.outputs), nbytes))
    return ops


def _producers(ops: list[_Op]) -> dict[str, int]:
    return {name: i for i, op in enumerate(ops) for name in op.writes}


def _last_reads(ops: list[_Op], final: set[str]) -> dict[str, int]:
    last = {}
    for i, op in enumerate(ops):
        for name in op.reads:
            last[name] = i
    last.update({name: len(ops) for name in final})
    return last


def plan_cuts(ops: list[_Op], final: set[str], chunks: int) -> list[int]:
    """Return ``chunks - 1`` op indices to cut ``main`` after, splitting weights evenly.

    ``final`` names the program's outputs. Weight bytes count at their first reader (constants
    can sit far from where they are used). Each cut is the op, among those with a weight share
    before it within CUT_TOLERANCE of its balanced point (else the nearest allowed op), that
    leaves the fewest live values crossing it. Raises SnapcError when the program has too few
    ops for the request.
    """
    last = _last_reads(ops, final)
    delta = np.zeros(len(ops) + 1, dtype=np.int64)
    at = np.zeros(len(ops), dtype=np.int64)
    first_reader: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.reads:
            first_reader.setdefault(name, i)
    for i, op in enumerate(ops):
        if op.weight:
            at[min((first_reader.get(n, i) for n in op.writes), default=i)] += op.nbytes
            continue
        for name in op.writes:
            if last.get(name, i) > i:
                delta[i] += 1
                delta[last[name]] -= 1
    live, cumulative = np.cumsum(delta), np.cumsum(at)
    total = int(cumulative[-1]) if len(ops) else 0
    cuts: list[int] = []
    for k in range(1, chunks):
        target = total * k / chunks
        allowed = [i for i in range(cuts[-1] + 1 if cuts else 0, len(ops) - 1)
                   if not ops[i].weight]
        allowed = allowed[:len(allowed) - (chunks - k - 1)]  # room for the cuts still to come
        if not allowed:
            raise SnapcError(f"cannot cut the program into {chunks} chunks; ask for fewer chunks")
        near = [i for i in allowed if abs(cumulative[i] - target) <= CUT_TOLERANCE * total]
        if not near:
            near = [min(allowed, key=lambda i: abs(cumulative[i] - target))]
        cuts.append(min(near, key=lambda i: (int(live[i]), abs(cumulative[i] - target))))
    return cuts


@dataclass(frozen=True)
class _Piece:
    """What chunk (start, end] keeps: op indices (weights included), inputs and outputs."""

    keep: list[int]
    inputs: list[str]
    outputs: list[str]
    nbytes: int


def _piece(ops: list[_Op], start: int, end: int, final: list[str],
           function_inputs: set[str]) -> _Piece:
    made, last = _producers(ops), _last_reads(ops, set(final))
    outputs = [name for i in range(start + 1, end + 1) if not ops[i].weight
               for name in ops[i].writes if last.get(name, -1) > end]
    needed, keep = set(outputs), set()
    for i in range(end, start, -1):  # the ops the outputs need (dead code dropped)
        if not ops[i].weight and needed & set(ops[i].writes):
            keep.add(i)
            needed.update(ops[i].reads)
    inputs: list[str] = []
    for i in sorted(keep):
        for name in ops[i].reads:
            source = made.get(name)
            if name in function_inputs or (source is not None and source <= start
                                           and not ops[source].weight):
                if name not in inputs:
                    inputs.append(name)
    for i in range(len(ops) - 1, -1, -1):  # the weights they read, wherever they sit
        if ops[i].weight and needed & set(ops[i].writes):
            keep.add(i)
            needed.update(ops[i].reads)
    nbytes = sum(ops[i].nbytes for i in keep if ops[i].weight)
    return _Piece(sorted(keep), inputs, outputs, nbytes)


def _feature(name: str, tensor_type: Any) -> Any:
    """Return the model-description entry of a boundary tensor (as ct.convert writes them)."""
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    kinds = {"FLOAT16": "FLOAT16", "FLOAT32": "FLOAT32", "FLOAT64": "DOUBLE", "INT32": "INT32"}
    dtype = _dtype_name(tensor_type)
    if dtype not in kinds:
        raise SnapcError(f"chunk boundary '{name}' is {dtype}, which Core ML cannot pass between "
                         "models; ask for a different --chunks count")
    array = FeatureTypes_pb2.ArrayFeatureType(
        shape=[d.constant.size for d in tensor_type.dimensions],
        dataType=getattr(FeatureTypes_pb2.ArrayFeatureType.ArrayDataType, kinds[dtype]))
    return Model_pb2.FeatureDescription(name=name, type=FeatureTypes_pb2.FeatureType(
        multiArrayType=array))


def _write_piece(spec: Any, piece: _Piece, reader: Any, path: Path) -> None:
    """Write the chunk ``piece`` of ``spec`` as the mlpackage ``path``, copying its weights from
    ``reader`` (the whole package's blob file)."""
    from coremltools import libmilstoragepython

    chunk = type(spec)()
    chunk.CopyFrom(spec)
    function = chunk.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    source_ops = list(_main_block(spec).operations)
    types = {o.name: o.type for op in source_ops for o in op.outputs}
    types.update({i.name: i.type for i in spec.mlProgram.functions["main"].inputs})
    described = {f.name: f for f in list(spec.description.input) + list(spec.description.output)}

    del block.operations[:]
    block.operations.extend(source_ops[i] for i in piece.keep)
    del block.outputs[:]
    block.outputs.extend(piece.outputs)
    del function.inputs[:]
    for name in piece.inputs:
        function.inputs.add(name=name, type=types[name])
    for field, names in ((chunk.description.input, piece.inputs),
                         (chunk.description.output, piece.outputs)):
        del field[:]
        field.extend(described[n] if n in described else _feature(n, types[n].tensorType)
                     for n in names)

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        writer = libmilstoragepython._BlobStorageWriter(str(weights / "weight.bin"))
        moved: dict[int, int] = {}
        for op in block.operations:
            for key, value in op.attributes.items():
                if key == "name" or value.WhichOneof("value") != "blobFileValue":
                    continue
                blob = value.blobFileValue
                if blob.offset not in moved:
                    kind = _BLOB_IO.get(_dtype_name(value.type.tensorType))
                    if kind is None:
                        raise SnapcError(f"cannot copy a {_dtype_name(value.type.tensorType)} "
                                         "weight into a chunk; use --chunks 1")
                    data = getattr(reader, f"read_{kind}_data")(blob.offset)
                    moved[blob.offset] = getattr(writer, f"write_{kind}_data")(data)
                blob.offset = moved[blob.offset]
                blob.fileName = "@model_path/weights/weight.bin"
        del writer  # flushes and closes weight.bin
        _create_package(chunk, weights, path)


def _create_package(spec: Any, weights: Path, path: Path) -> None:
    try:
        from coremltools.models.utils import _create_mlpackage
    except ImportError:  # older or newer coremltools: the public (slower) route
        import coremltools as ct

        ct.models.MLModel(spec, weights_dir=str(weights), skip_model_load=True).save(str(path))
        return
    _create_mlpackage(spec, str(weights), str(path))


def split_package(whole: Path, chunks: int, paths: list[Path]) -> list[ChunkSpec]:
    """Split the mlpackage ``whole`` into ``chunks`` packages written to ``paths`` (in chain
    order); return their ChunkSpecs. Raises SnapcError for fewer than 2 chunks, or a program
    that cannot be cut that often."""
    import coremltools as ct
    from coremltools import libmilstoragepython
    from coremltools.models.utils import _try_get_weights_dir_path

    if chunks < 2:
        raise SnapcError(f"chunking needs at least 2 chunks, got {chunks}; pass --chunks 2 or more")
    if len(paths) != chunks:
        raise ValueError(f"{chunks} chunks need {chunks} paths, got {len(paths)}")
    spec = ct.utils.load_spec(str(whole))
    ops = read_ops(spec)
    final = list(_main_block(spec).outputs)
    cuts = plan_cuts(ops, set(final), chunks)
    function_inputs = {i.name for i in spec.mlProgram.functions["main"].inputs}
    weights = Path(_try_get_weights_dir_path(str(whole)) or "") / "weight.bin"
    reader = libmilstoragepython._BlobStorageReader(str(weights)) if weights.is_file() else None
    bounds = [-1, *cuts, len(ops) - 1]
    out = []
    for k, path in enumerate(paths):
        piece = _piece(ops, bounds[k], bounds[k + 1], final, function_inputs)
        if path.exists():
            shutil.rmtree(path)
        _write_piece(spec, piece, reader, path)
        out.append(ChunkSpec(index=k + 1, start=bounds[k], end=bounds[k + 1],
                             inputs=tuple(piece.inputs), outputs=tuple(piece.outputs),
                             weight_bytes=piece.nbytes))
    return out


def chunks_needed(total_bytes: int, max_bytes: int) -> int:
    """Return the fewest chunks that could keep every chunk under ``max_bytes`` (at least 1)."""
    return max(1, math.ceil(total_bytes / max_bytes))
