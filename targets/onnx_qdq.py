"""Realise a graph's quantization records in a saved ONNX model (QDQ form).

Per record scheme, the fp32 initializer of the weight is replaced by (new tensors named after
it, the original name becomes the output of the last node, so consumers are untouched)::

    fp16         fp16 initializer -> Cast(float)
    w8           int8 initializer, fp32 scales -> DequantizeLinear(axis = output channel)
    w4           int4 initializer, fp32 group scales -> DequantizeLinear(axis, block_size)
                 (opset 21 blocked quantization; the model's opset is raised to 21)
    palette{n}   n-bit indices packed little-endian, lcm(8, n)/n per lcm(8, n)/8 bytes, and
                 the look-up table -> Cast/Mul/ReduceSum (bytes to one int32 word) -> Div/Mod
                 (unpack the fields) -> Gather(lut) -> Reshape; onnxruntime folds it at load
    w8a8         w8, plus QuantizeLinear->DequantizeLinear (uint8) on the layer's input, on a
                 Conv's output, and an int32 bias (scale = input scale * weight scales), the
                 pattern onnxruntime fuses into QLinearConv / MatMulIntegerToFloat

The rewritten model records the onnxruntime session config it must run under
(:mod:`snapc.targets.onnx_session`: weight-only artifacts turn onnxruntime's QDQ rewrites off,
which would otherwise quantize the activations of their MatMuls at run time).

Initializers are matched to records by value (shape and hash of the fp32 bytes, or of the
transpose for 2-d weights that the exporter transposed for MatMul), so names given by the
exporter or onnxsim do not matter. Run it after onnxsim: simplifying would fold the DQ
subgraphs back into fp32 constants. The result computes what
:func:`snapc.passes.quantize.apply_records_to_module` computes in torch.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapc.graph import Graph
from snapc.passes.quantize import NODE_PREFIX, quant_records
from snapc.passes.quantize_schemes import weight_codes
from snapc.targets.onnx_session import config_for, session_options, write_config

__all__ = ["apply_qdq", "int8_kernels", "QDQ_OPSET"]

QDQ_OPSET = 21  # blocked (int4 group-wise) DequantizeLinear
_EXTERNAL_ABOVE = 1_800_000_000  # bytes; protobuf cannot hold a message over 2 GB
_INT8_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeMatMul")


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return tuple(data.shape), hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


class _Builder:
    """Collects the new initializers and nodes of the edited model."""

    def __init__(self) -> None:
        self.inits: list[Any] = []
        self.nodes: list[Any] = []

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=f"qdq_{output}", **attrs))
        return output


def _weight_nodes(b: _Builder, name: str, w: torch.Tensor, record: dict[str, Any],
                  transposed: bool) -> None:
    """Emit the nodes that rebuild initializer ``name`` from its quantized storage."""
    import ml_dtypes

    scheme = record["scheme"]
    if scheme == "fp16":  # the initializer holds w.T when the exporter transposed it for MatMul
        stored = w.T if transposed else w
        b.node("Cast", [b.const(f"{name}_fp16", stored.contiguous().numpy().astype(np.float16))],
               name, to=1)
        return
    codes = weight_codes(w, record)
    codes = codes.T if transposed else codes
    if scheme in ("w8", "w8a8"):
        b.node("DequantizeLinear", [b.const(f"{name}_q", codes.numpy()),
                                    b.const(f"{name}_scale", record["scale"].numpy())],
               name, axis=1 if transposed else 0)
    elif scheme == "w4":
        scale = record["scale"].T if transposed else record["scale"]
        b.node("DequantizeLinear",
               [b.const(f"{name}_q", codes.numpy().astype(ml_dtypes.int4)),
                b.const(f"{name}_scale", scale.contiguous().numpy())],
               name, axis=0 if transposed else 1, block_size=record["group_size"])
    elif scheme.startswith("palette"):
        _palette_nodes(b, name, codes.numpy(), record["bits"], record["lut"].numpy(),
                       tuple(codes.shape))
    else:
        raise ValueError(f"scheme '{scheme}' has no ONNX realisation")


def _palette_nodes(b: _Builder, name: str, codes: np.ndarray, bits: int, lut: np.ndarray,
                   shape: tuple[int, ...]) -> None:
    group_bits = math.lcm(8, bits)
    per_word, word_bytes = group_bits // bits, group_bits // 8
    flat = codes.reshape(-1).astype(np.int64)
    n = flat.size
    flat = np.concatenate([flat, np.zeros((-n) % per_word, np.int64)]).reshape(-1, per_word)
    word = (flat << (bits * np.arange(per_word))).sum(axis=1)
    packed = ((word[:, None] >> (8 * np.arange(word_bytes))) & 255).astype(np.uint8)
    x = b.node("Cast", [b.const(f"{name}_packed", packed)], f"{name}_bytes", to=6)  # int32
    x = b.node("Mul", [x, b.const(f"{name}_bytemul", (256 ** np.arange(word_bytes))
                                  .astype(np.int32))], f"{name}_shifted")
    x = b.node("ReduceSum", [x, b.const(f"{name}_axis", np.array([1], np.int64))],
               f"{name}_word", keepdims=1)
    x = b.node("Div", [x, b.const(f"{name}_fielddiv", (2 ** (bits * np.arange(per_word)))
                                  .astype(np.int32))], f"{name}_fields")
    x = b.node("Mod", [x, b.const(f"{name}_mask", np.array(2**bits, np.int32))], f"{name}_idx2")
    x = b.node("Reshape", [x, b.const(f"{name}_flat", np.array([-1], np.int64))], f"{name}_idx1")
    x = b.node("Slice", [x, b.const(f"{name}_start", np.array([0], np.int64)),
                         b.const(f"{name}_end", np.array([n], np.int64))], f"{name}_idx")
    x = b.node("Gather", [b.const(f"{name}_lut", lut.astype(np.float32)), x], f"{name}_values",
               axis=0)
    b.node("Reshape", [x, b.const(f"{name}_shape", np.array(shape, np.int64))], name)


def _activation_nodes(b: _Builder, model: Any, consumer: Any, weight: str,
                      record: dict[str, Any]) -> None:
    """Put uint8 Q/DQ on the consumer's data input (and a Conv's output); bias -> int32."""
    data = 0 if consumer.op_type in ("Conv", "Gemm") or consumer.input[1] == weight else 1
    key = consumer.name or weight
    s_in = b.const(f"{key}_in_scale", np.array(record["input_scale"], np.float32))
    z_in = b.const(f"{key}_in_zp", np.array(record["input_zero_point"], np.uint8))
    q = b.node("QuantizeLinear", [consumer.input[data], s_in, z_in], f"{key}_in_q")
    consumer.input[data] = b.node("DequantizeLinear", [q, s_in, z_in], f"{key}_in_dq")
    if consumer.op_type == "Conv" and len(consumer.input) > 2 and consumer.input[2]:
        bias_name = consumer.input[2]
        init = next(i for i in model.graph.initializer if i.name == bias_name)
        from onnx import numpy_helper

        scale = (record["input_scale"] * record["scale"]).numpy().astype(np.float32)
        q_bias = np.round(numpy_helper.to_array(init) / scale).astype(np.int32)
        consumer.input[2] = b.node("DequantizeLinear", [
            b.const(f"{key}_bias_q", q_bias), b.const(f"{key}_bias_scale", scale)],
            f"{key}_bias_dq", axis=0)
    if "output_scale" in record:
        out = consumer.output[0]
        consumer.output[0] = f"{key}_out_float"
        s_out = b.const(f"{key}_out_scale", np.array(record["output_scale"], np.float32))
        z_out = b.const(f"{key}_out_zp", np.array(record["output_zero_point"], np.uint8))
        q = b.node("QuantizeLinear", [consumer.output[0], s_out, z_out], f"{key}_out_q")
        b.node("DequantizeLinear", [q, s_out, z_out], out)


def _match(model: Any, graph: Graph, records: dict[str, dict[str, Any]]
           ) -> tuple[dict[str, tuple[str, bool]], list[str]]:
    """Return ({record key: (initializer name, transposed)}, unmatched record keys)."""
    from onnx import numpy_helper

    index: dict[tuple, str] = {}
    for init in model.graph.initializer:
        if init.data_type == 1:  # FLOAT
            index.setdefault(_digest(numpy_helper.to_array(init)), init.name)
    state = graph.program.state_dict
    found, unmatched = {}, []
    for key in records:
        w = state[f"{graph.root}.{key}"].detach().float().numpy()
        for transposed, array in ((False, w), (True, w.T if w.ndim == 2 else None)):
            name = None if array is None else index.get(_digest(array))
            if name is not None:  # equal weights may share one initializer
                found[key] = (name, transposed)
                break
        else:
            unmatched.append(key)
    return found, unmatched


def apply_qdq(model_path: Path | str, graph: Graph,
              records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Rewrite the ONNX model at ``model_path`` (in place) so it stores and computes the
    quantization ``records`` (default: those of ``graph``) of the graph it was exported from.

    Returns info: records realised per scheme, unmatched record keys (weights the exporter
    folded into other constants, left fp32), fp32 island nodes (fp32 here anyway), the
    onnxruntime session config written into the model (onnx_session.config_for) and the
    model's bytes on disk.
    """
    import onnx

    path = Path(model_path)
    records = quant_records(graph) if records is None else records
    weights = {k: r for k, r in records.items()
               if not k.startswith(NODE_PREFIX) and r["scheme"] != "fp32"}
    model = onnx.load(str(path))
    found, unmatched = _match(model, graph, weights)
    b = _Builder()
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node)
    replaced = set()
    state = graph.program.state_dict
    for key, (name, transposed) in found.items():
        record = weights[key]
        if name in replaced:  # shared by an equal weight already realised
            continue
        _weight_nodes(b, name, state[f"{graph.root}.{key}"].detach().float(), record,
                      transposed)
        replaced.add(name)
        if record["scheme"] == "w8a8" and "input_scale" in record and name in consumers:
            _activation_nodes(b, model, consumers[name], name, record)
    used = {i for node in list(model.graph.node) + b.nodes for i in node.input}
    orphaned = {name for name in consumers if name not in used}  # fp32 biases now int32
    kept = [i for i in model.graph.initializer if i.name not in replaced | orphaned]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + b.inits)
    _insert_nodes(model, b.nodes)
    config = config_for(weights[k]["scheme"] for k in found)
    write_config(model, config)
    if any(r["scheme"] == "w4" for r in weights.values()):
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, QDQ_OPSET)
    _save(model, path)
    return {"realised": dict(Counter(weights[k]["scheme"] for k in found)),
            "unmatched": unmatched,
            "fp32_islands": sum(k.startswith(NODE_PREFIX) for k in records),
            "session_config": config,
            "model_bytes": sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*"))}


def _insert_nodes(model: Any, new_nodes: list[Any]) -> None:
    """Add ``new_nodes`` and re-sort all nodes topologically (inputs before users)."""
    nodes = list(model.graph.node) + new_nodes
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"QDQ rewrite left {len(rest)} nodes with missing inputs, e.g. "
                             f"{rest[0].op_type} {rest[0].name}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _save(model: Any, path: Path) -> None:
    import onnx

    for old in path.parent.glob(f"{path.name}.data"):
        old.unlink()
    large = model.ByteSize() > _EXTERNAL_ABOVE if hasattr(model, "ByteSize") else True
    onnx.save(model, str(path), save_as_external_data=large,
              location=f"{path.name}.data" if large else None)


def int8_kernels(model_path: Path | str) -> dict[str, int]:
    """Return {op type: count} of onnxruntime's integer kernels in the CPU-optimised model
    (under its recorded session config), i.e. the QDQ groups onnxruntime fused into int8
    compute."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(model_path)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    counts = Counter(n.op_type for n in optimized.graph.node)
    return {op: counts[op] for op in _INT8_OPS if counts[op]}
